"""StepEngine: the one interface every backend runner implements (torch, ort, trt).

An engine runs the model's step functions on device tensors and owns no decoding logic. Step
functions are declared once as data (`arexport.format.stepkinds`): `run(kind, cache, **feeds)`
validates the feeds against the declaration, converts them to the graph's dtypes, counts and times
the call under the kind's label, runs the backend's one hook `_forward` and returns the declared
outputs, writing K/V into the cache buffers in place. Typed helpers are thin wrappers over it:
* `step(cache, tokens, positions, write_index, attn_mask)` -> logits [B, q, V] (the `token` kind);
* `multi_query_step(...)` (ARPG), `scale_step(...)` (VAR), `prefill_embeds(...)` (caption prefill);
* `next_scale(si, f_hat, h)` and `decode_latents(f_hat)`: VAR's VQVAE graphs (no cache);
* `decode_images(tokens)` turns token sequences into uint8 RGB images.
How a condition is prefilled is the family adapter's business (`engine.family.prefill`). Every
call is counted (and optionally timed) per label, which is how decoding methods report forward
passes without trusting themselves.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Optional, Union

import torch

from arexport.errors import ArexportError
from arexport.families import Conditions, get_family
from arexport.format.spec import ModelSpec, s_max_for
from arexport.format.stepkinds import CAPTION_PREFILL, MASKED, MULTI_QUERY, SCALE, TOKEN, StepKind, get_step_kind
from arexport.runtime.kv_cache import KVCache

__all__ = ["Conditions", "StepEngine", "StepRecord", "declared_feeds", "step_kind"]


@dataclass
class StepRecord:
    """One timed engine call."""

    kind: str  # a step kind's label (prefill | decode | verify | multi_query | scale) or next_scale | vq_decode | latent_decode
    batch: int
    q: int
    seconds: float


# an EAGLE draft head's call (runtime/methods/eagle.py): timed into the target's records when it records timings,
# never counted in its calls; `profile` reports it as a step of its own, apart from the target's and the host's time
HEAD_RECORD = "draft_head"
NOT_FORWARDS = ("vq_decode", "next_scale", "latent_decode", "text_encode", HEAD_RECORD)  # not target forwards

TORCH_DTYPES = {"int64": torch.int64, "bool": torch.bool, "float32": torch.float32}


def declared_feeds(kind: StepKind, device, model_dtype: torch.dtype, feeds: dict) -> dict[str, torch.Tensor]:
    """`feeds` on `device`, contiguous, in the declared order and dtypes ("model": the engine's precision)."""
    return {io.name: torch.as_tensor(feeds[io.name]).to(device, TORCH_DTYPES.get(io.dtype, model_dtype)).contiguous()
            for io in kind.inputs}


_UNTIMED = nullcontext()


def live_bucket(slots: int) -> int:
    """Granularity of the live bound for a cache of `slots` slots: 32, or more so that a cache has at
    most 16 widths (each width is its own launch: IOBinding, CUDA graph, TensorRT shape)."""
    per = -(-slots // 16)
    return max(32, (per + 7) // 8 * 8)


def live_width(masks: list[torch.Tensor], slots: int) -> int:
    """The live bound of one call: 1 + the last slot any query of any row may see in `masks` (each
    [B, 1, q, slots] bool), rounded up to live_bucket(slots) and at most `slots`; `slots` when no slot
    is visible. Slots at or past it are hidden from every query, so attention may skip them."""
    seen = masks[0].reshape(-1, slots).any(0)
    for m in masks[1:]:
        seen |= m.reshape(-1, slots).any(0)
    last = slots - int(torch.argmax(seen.flip(0).to(torch.uint8)))
    if not bool(seen[last - 1]):
        return slots
    bucket = live_bucket(slots)
    return min(slots, -(-last // bucket) * bucket)


def graphs_take_live_masks(manifest) -> bool:
    """Whether an engine directory's step graphs declare their masks' last dim as the live bound (built
    since issue 35); directories built before take masks as wide as the cache only."""
    shapes = [i["shape"] for name, kind in manifest.step_graphs().items() for i in manifest.graphs[name].inputs
              if any(io.name == i["name"] and MASKED in io.dims for io in kind.inputs)]
    return bool(shapes) and all(sh[-1] == MASKED for sh in shapes)


def narrow_masks(kind: StepKind, feeds: dict, slots: int) -> dict:
    """`feeds` with every attention mask (inputs with the live dim, format.stepkinds.MASKED) cut to the
    live bound of the call: [.., slots] -> [.., L] views (issue 35: attention reads L slots, not S)."""
    names = [io.name for io in kind.inputs if MASKED in io.dims]
    if not names or feeds[names[0]].shape[-1] != slots:
        return feeds
    width = live_width([torch.as_tensor(feeds[n]) for n in names], slots)
    if width == slots:
        return feeds
    return {n: (t[..., :width] if n in names else t) for n, t in feeds.items()}


def step_kind(q: int) -> str:
    """Label of a token step by its query length: decode (q = 1) or verify (q > 1)."""
    return TOKEN.label({"q": q})


class StepEngine(ABC):
    """Base class: counting, timing, validation and cache allocation shared by all backends."""

    backend: str = "?"
    fixed_slots: Optional[int] = None  # graph backends: the cache length their graphs were built for
    live_masks: bool = False  # whether its step graphs take masks narrowed to the live bound (narrow_masks)

    def __init__(self, spec: ModelSpec, device: torch.device, cache_dtype: torch.dtype, max_q: Optional[int] = None):
        self.spec = spec
        self.family = get_family(spec.family)
        self.device = torch.device(device)
        self.cache_dtype = cache_dtype
        self.calls: Counter = Counter()
        self.record_timings = False
        self.records: list[StepRecord] = []
        self.max_q: int = max_q if max_q is not None else spec.n_tokens
        self.max_batch: Optional[int] = None  # most rows one call may have (None: no limit)
        self._latency: dict[tuple, torch.Tensor] = {}  # (rows, max_q) -> latency_curve
        # (rows, max_q) -> a curve from the user's latency profile: the only timings speculation reads
        self.profiled_latency: dict[tuple, torch.Tensor] = {}
        self._plans: dict[tuple, tuple] = {}  # call signature -> StepEngine._plan's outcome (see run)
        self.text_encoder = None  # runtime.text: prompts -> T5 caption features (LlamaGen t2i) or prompt ids (ChatPrompter, Janus)

    # -- to implement ---------------------------------------------------------------------------
    @abstractmethod
    def _forward(self, kind: StepKind, cache: KVCache, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Backend forward of a declared step kind: feeds (declared names, dtypes, on this device) ->
        the declared outputs by name; the cache is updated in place."""

    def step_kinds(self) -> tuple[str, ...]:
        """The step kinds this engine runs (its model's or its directory's step graphs)."""
        return tuple(self.family.steps(self.spec))

    def _next_scale(self, si: int, f_hat: torch.Tensor, h: torch.Tensor):
        """Backend VQVAE next-scale input: (f_hat, next inputs or None)."""
        raise ArexportError(f"backend {self.backend} has no next-scale graphs for {self.spec.name}")

    def _decode_latents(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Backend VQVAE decoder: f_hat [N,Cvae,H,W] -> uint8 [N,H',W',3]."""
        raise ArexportError(f"backend {self.backend} has no latent decoder for {self.spec.name}")

    @abstractmethod
    def _decode_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N, n_tokens] -> uint8 [N,H,W,3]."""

    @property
    def has_images(self) -> bool:
        """Whether this engine can decode tokens into images."""
        return True

    def codebook(self) -> torch.Tensor:
        """Codebook latents [V, d] used for latent-space neighbourhoods (LANTERN, VVS)."""
        raise ArexportError(f"backend {self.backend} has no codebook")

    def neighbors(self, k: int) -> torch.Tensor:
        """[V, min(k, V-1)] nearest other codes by L2 distance between codebook latents (cached)."""
        have = getattr(self, "_neighbors", None)
        if have is None or have.shape[1] < min(k, self.spec.vocab_size - 1):
            have = self._load_neighbors(k)
            if have is None or have.shape[1] < min(k, self.spec.vocab_size - 1):
                from arexport.format.arrays import latent_neighbors

                cb = self.codebook().cpu()
                if cb.shape[0] != self.spec.vocab_size:
                    raise ArexportError(f"codebook has {cb.shape[0]} entries but the model's vocabulary has {self.spec.vocab_size}")
                have = latent_neighbors(cb, k)
            self._neighbors = have
        return have[:, :k]

    def _load_neighbors(self, k: int):
        """Backends with an engine directory return its precomputed table (or None)."""
        return None

    def encode_prompts(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts through the engine's text encoder: (caption features [N, T, C], mask [N, T] bool) for
        LlamaGen t2i, (prompt ids [N, T], mask) for a chat model; the family adapter reads which."""
        if self.text_encoder is None:
            raise ArexportError(f"{self.spec.name} takes prompts only with its text encoder: pass --text-encoder DIR (a T5 "
                                "save_pretrained directory), or build the engine with --text-encoder")
        with self._timed("text_encode", len(prompts), 0):
            return self.text_encoder(prompts)

    def null_caption(self) -> torch.Tensor:
        """t2i: the null caption features [T, C] for unconditional CFG rows."""
        raise ArexportError(f"backend {self.backend} has no null caption")

    # -- public API ------------------------------------------------------------------------------
    def allocate(self, batch: int, lookahead: int = 0) -> KVCache:
        """Static cache buffers for `batch` rows, with at least `lookahead` slots past a whole image."""
        self.check_batch(batch)
        need = s_max_for(self.spec.cond_len, self.spec.n_tokens, lookahead)
        slots = self.fixed_slots if self.fixed_slots is not None else max(need, self.spec.s_max)
        if slots < self.spec.cond_len + self.spec.n_tokens + lookahead:
            raise ArexportError(f"this engine's cache has {slots - self.spec.min_slots} lookahead slots; {lookahead} "
                                "are needed for this query length: rebuild with a larger --verify-len")
        return KVCache.allocate(self.spec, batch, self.cache_dtype, self.device, slots)

    LATENCY_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)

    def latency_curve(self, rows: int, max_q: int) -> torch.Tensor:
        """Seconds of one step with q = 1 .. max_q queries over `rows` cache rows: float64 [max_q],
        index q - 1. Measured once per (rows, max_q) and engine (median of 3 timed calls after a warm-up
        at each grid point, linear in between) on a scratch cache; these calls are not counted as
        forwards. `arexport profile` records it; decoding reads only curves loaded from a profile
        (`load_latency_curves`, runtime/step_cost.py), so no clock decides a seed's tokens."""
        key = (rows, max_q)
        have = self._latency.get(key)
        if have is not None:
            return have
        import numpy as np

        cache = self.allocate(rows, lookahead=max_q - 1)
        grid = sorted({q for q in self.LATENCY_GRID if q <= max_q} | {max_q})
        seconds = []
        for q in grid:
            tokens = torch.zeros(rows, q, dtype=torch.long, device=self.device)
            positions = torch.arange(q, device=self.device).expand(rows, q)
            write = torch.full((rows,), self.spec.cond_len, dtype=torch.long, device=self.device)
            feeds = declared_feeds(TOKEN, self.device, self.cache_dtype, dict(
                tokens=tokens, positions=positions, write_index=write, attn_mask=cache.causal_mask(write, q)))
            times = []
            for _ in range(4):
                self._sync()
                t0 = time.perf_counter()
                self._forward(TOKEN, cache, feeds)
                self._sync()
                times.append(time.perf_counter() - t0)
            seconds.append(float(np.median(times[1:])))
        curve = torch.from_numpy(np.interp(np.arange(1, max_q + 1), grid, seconds))
        self._latency[key] = curve
        return curve

    def latency_curves(self) -> dict[str, list[float]]:
        """The curves measured so far, as JSON: "rows,max_q" -> seconds per q = 1..max_q."""
        return {f"{r},{q}": [float(x) for x in c] for (r, q), c in self._latency.items()}

    def load_latency_curves(self, curves: dict[str, list[float]]) -> None:
        """Use curves from a profile JSON (latency_curves) instead of measuring them; each must cover
        q = 1..max_q with finite positive seconds."""
        for key, values in curves.items():
            try:
                rows, max_q = (int(x) for x in key.split(","))
                curve = torch.tensor([float(v) for v in values], dtype=torch.float64)
            except (ValueError, TypeError):
                raise ArexportError(f"latency curve {key!r}: expected 'rows,max_q' -> a list of seconds") from None
            if rows < 1 or max_q < 1 or curve.numel() != max_q or not bool(torch.isfinite(curve).all() and (curve > 0).all()):
                raise ArexportError(f"latency curve {key!r}: needs {max_q} finite positive seconds (q = 1..{max_q})")
            self._latency[(rows, max_q)] = self.profiled_latency[(rows, max_q)] = curve

    def check_batch(self, batch: int) -> None:
        if self.max_batch is not None and batch > self.max_batch:
            raise ArexportError(f"a batch of {batch} rows exceeds this engine's largest batch of {self.max_batch} rows "
                                "(rows include the doubled CFG batch): lower --batch-size or rebuild with larger --batch-sizes")

    def run(self, kind: Union[str, StepKind], cache: KVCache, label: Optional[str] = None,
            **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run a declared step kind: feeds by input name (any dtype: converted to the declared ones) ->
        its outputs by name (logits fp32, ...), K/V written into `cache` in place. Counted as `label`
        (default: the kind's own by query length; "prefill" also lifts the query-length limit, a
        prefill through the step graph being sized by the engine's build)."""
        kind = get_step_kind(kind)
        # the checks and conversions below depend only on the feeds' names, shapes, dtypes and devices:
        # a call shaped like an earlier one (every decode step of a run) reuses their outcome (issue 35:
        # this ran at every step and cost as much as a small model's sampling)
        try:
            sig = (kind.name, label, *[(n, t.shape, t.dtype, t.device) for n, t in feeds.items()])
        except AttributeError:  # a feed that is not a tensor yet: the full path converts it
            sig = None
        plan = self._plans.get(sig) if sig is not None else None
        if plan is None:
            plan = self._plan(kind, label, feeds)
            if sig is not None:
                if len(self._plans) >= 1024:  # bounded: (kind, shapes) combinations
                    self._plans.clear()
                self._plans[sig] = plan
        label, batch, count, ready = plan
        if self.live_masks:
            feeds = narrow_masks(kind, feeds, cache.s_max)
            ready = False  # the narrowed width varies per call
        if ready:  # declared order, dtypes and device already: only contiguity may differ
            feeds = {n: t.contiguous() for n, t in feeds.items()}
        else:
            feeds = declared_feeds(kind, self.device, self.cache_dtype, feeds)
        with self._timed(label, batch, count):
            out = self._forward(kind, cache, feeds)
        for name, t in out.items():  # every logits output (a kind may declare more than one head)
            if name.startswith("logits"):
                self._finite(t, label)
        return out

    def _plan(self, kind: StepKind, label: Optional[str], feeds: dict) -> tuple:
        """Validate a call's feeds against the declaration: (label, batch, count dim, whether the feeds
        are in the declared order, dtypes and on this device, so that `declared_feeds` would not change them)."""
        if kind.name not in self.step_kinds():
            raise ArexportError(f"{self.spec.name} is an {self.spec.family} model without a {kind.name} step "
                                f"(it has {', '.join(self.step_kinds())}): it decodes with --method {self.family.default_method}")
        dims = kind.bind(feeds)
        if label != "prefill":
            for d in kind.query_dims:
                if dims[d] > self.max_q:
                    raise ArexportError(f"{kind.name} step with {d} = {dims[d]} exceeds this engine's maximum query length "
                                        f"{self.max_q}")
        ready = list(feeds) == list(kind.input_names) and all(
            isinstance(t := feeds[io.name], torch.Tensor) and t.device == self.device
            and t.dtype == TORCH_DTYPES.get(io.dtype, self.cache_dtype) for io in kind.inputs)
        return label or kind.label(dims), dims["batch"], dims[kind.count_dim], ready

    def step(self, cache: KVCache, tokens, positions, write_index, attn_mask, kind: Optional[str] = None) -> torch.Tensor:
        """Feed q new tokens [B,q] at positions [B,q] from slot write_index [B]; logits [B,q,V]. `kind`
        labels the call (default decode/verify by q)."""
        return self.run(TOKEN, cache, label=kind, tokens=tokens, positions=positions, write_index=write_index,
                        attn_mask=attn_mask)["logits"]

    def multi_query_step(self, cache: KVCache, tokens, positions, write_index, attn_mask, query_positions,
                         query_mask) -> torch.Tensor:
        """ARPG: feed n new tokens [B,n] and ask m queries at query_positions [B,m]; logits [B,m,V]."""
        return self.run(MULTI_QUERY, cache, tokens=tokens, positions=positions, write_index=write_index, attn_mask=attn_mask,
                        query_positions=query_positions, query_mask=query_mask)["logits"]

    def scale_step(self, cache: KVCache, features, positions, classes, write_index, attn_mask) -> torch.Tensor:
        """Next-scale step: q positions [B,q] with their Cvae features [B,q,Cvae] (ignored at the first
        scale), class ids [B] (null class for CFG rows), from slot write_index [B]; logits [B,q,V]."""
        return self.run(SCALE, cache, features=features, positions=positions, classes=classes, write_index=write_index,
                        attn_mask=attn_mask)["logits"]

    def next_scale(self, si: int, f_hat: torch.Tensor, h: torch.Tensor):
        """VQVAE next-scale input of scale si: h [B, pn*pn, Cvae] (codebook rows) added to f_hat
        [B,Cvae,H,W]; returns (f_hat, the next scale's inputs [B, pn'*pn', Cvae] or None after the last)."""
        with self._timed("next_scale", h.shape[0], h.shape[1]):
            return self._next_scale(si, f_hat, h)

    def decode_latents(self, f_hat: torch.Tensor) -> torch.Tensor:
        """VQVAE latents f_hat [N,Cvae,H,W] -> uint8 RGB [N,H',W',3]."""
        with self._timed("latent_decode", f_hat.shape[0], 0):
            return self._decode_latents(f_hat)

    def prefill_embeds(self, cache: KVCache, embeds: torch.Tensor, attn_mask) -> torch.Tensor:
        """Text-conditional prefill: caption features [B,T,C] at slots [0, T); logits of the last position [B,V]."""
        return self.run(CAPTION_PREFILL, cache, cond_embeds=embeds, attn_mask=attn_mask)["logits"]

    def _finite(self, logits: torch.Tensor, kind: str) -> torch.Tensor:
        """Stop on NaN/inf logits (a broken checkpoint or engine) instead of sampling garbage (one host sync).

        A float32 sum is finite exactly when no entry is NaN or infinite, unless it overflows: only then
        (astronomically large logits) does the entry-wise test decide. The sum costs ~1/25 of it on a CPU."""
        if not math.isfinite(float(logits.sum(dtype=torch.float32))) and not bool(torch.isfinite(logits).all()):
            row = int(torch.nonzero(~torch.isfinite(logits).flatten(1).all(1))[0])
            raise ArexportError(f"non-finite logits from the {self.backend} engine at {kind} call {self.calls[kind]} in "
                                f"row {row}: the weights or the engine produce NaN/inf")
        return logits

    def decode_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raster tokens [N, n_tokens] -> uint8 RGB [N, H, W, 3] (on this engine's device)."""
        tokens = tokens.to(self.device).long()
        bad = (tokens < 0) | (tokens >= self.spec.vocab_size)
        if bool(bad.any()):
            raise ArexportError(f"token ids outside the vocabulary [0, {self.spec.vocab_size}) cannot be decoded")
        with self._timed("vq_decode", tokens.shape[0], tokens.shape[1]):
            return self._decode_images(tokens)

    # -- bookkeeping ----------------------------------------------------------------------------
    def _timed(self, kind: str, batch: int, q: int):
        """Counts the call; times it (and names an NVTX range on CUDA) when asked to. Untimed CPU
        calls get a shared no-op context: this runs at every step."""
        self.calls[kind] += 1
        if not self.record_timings and self.device.type != "cuda":
            return _UNTIMED
        return self._timed_range(kind, batch, q)

    @contextmanager
    def _timed_range(self, kind: str, batch: int, q: int):
        nvtx = self.device.type == "cuda"
        if nvtx:  # named ranges make Nsight Systems timelines readable
            torch.cuda.nvtx.range_push(f"{kind} b{batch} q{q}")
        try:
            if not self.record_timings:
                yield
                return
            self._sync()
            t0 = time.perf_counter()
            yield
            self._sync()
            self.records.append(StepRecord(kind, batch, q, time.perf_counter() - t0))
        finally:
            if nvtx:
                torch.cuda.nvtx.range_pop()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def forward_count(self) -> int:
        """Model forward passes so far (prefill + every step kind; image decoding excluded)."""
        return sum(v for k, v in self.calls.items() if k not in NOT_FORWARDS)
