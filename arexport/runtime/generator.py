"""Generator: the public API — load an engine (model name or engine directory), generate images.

    gen = Generator.load("demo")                       # torch backend, packaged weights
    gen = Generator.load("engines/demo", backend="ort")  # an engine directory
    out = gen.generate(classes=[3, 7], method="ar", seed=0)
    out.tokens, out.images, out.stats

Image i of a call uses the row seed `image_seed(seed, i)`, so a result does not depend on the
batch size or on which other requests share the batch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from arexport.errors import ArexportError
from arexport.runtime.decoding import make_method
from arexport.runtime.engine import Conditions, StepEngine
from arexport.runtime.rng import RowRNG, image_seed
from arexport.runtime.sampling import SamplingParams


@dataclass
class GenerationResult:
    """tokens [N, n_tokens] int64 (raster), images [N, H, W, 3] uint8 or None, stats."""

    tokens: np.ndarray
    images: Optional[np.ndarray]
    stats: dict[str, Any] = field(default_factory=dict)


def percentiles(values: Sequence[float], qs=(50, 90, 99)) -> dict[str, float]:
    """{'p50': .., 'p90': .., 'p99': ..} by linear interpolation (numpy's default); empty -> {}."""
    if len(values) == 0:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


class Generator:
    """Thread-safe front end over a target engine (and an optional draft engine)."""

    def __init__(self, engine: StepEngine, draft: Optional[StepEngine] = None):
        self.engine = engine
        self.draft = draft
        self._lock = threading.Lock()

    @classmethod
    def load(cls, source: str, backend: str = "torch", device: str = "cpu", draft: Optional[str] = None, **kw) -> "Generator":
        """Open a model name or engine directory on a backend; `draft` names a draft model/engine."""
        from arexport.runtime.loading import open_engine

        engine = open_engine(source, backend=backend, device=device, **kw)
        draft_engine = None
        if draft is not None:
            dkw = {k: v for k, v in kw.items() if k in ("dtype",)}
            draft_engine = open_engine(draft, backend=backend, device=device, **dkw)
        return cls(engine, draft_engine)

    @property
    def spec(self):
        return self.engine.spec

    def conditions(self, classes=None, captions=None, caption_mask=None) -> Conditions:
        """Validate and pack user conditions into a Conditions batch."""
        spec = self.spec
        if spec.model_type == "c2i":
            if classes is None or len(classes) == 0:
                raise ArexportError(f"model {spec.name} is class-conditional: give at least one class id")
            ids = torch.as_tensor(np.asarray(classes, dtype=np.int64))
            bad = ids[(ids < 0) | (ids >= spec.num_classes)]
            if bad.numel():
                raise ArexportError(f"class id {int(bad[0])} out of range [0, {spec.num_classes - 1}] for model {spec.name}")
            return Conditions(classes=ids)
        if captions is None:
            raise ArexportError(f"model {spec.name} is text-conditional: give caption embeddings [N, {spec.cond_len}, {spec.caption_dim}]")
        emb = torch.as_tensor(np.asarray(captions, dtype=np.float32))
        if emb.dim() != 3 or tuple(emb.shape[1:]) != (spec.cond_len, spec.caption_dim):
            raise ArexportError(f"caption embeddings must have shape [N, {spec.cond_len}, {spec.caption_dim}], got {list(emb.shape)}")
        mask = torch.ones(emb.shape[:2], dtype=torch.bool) if caption_mask is None else torch.as_tensor(np.asarray(caption_mask)).bool()
        if tuple(mask.shape) != tuple(emb.shape[:2]):
            raise ArexportError(f"caption mask must have shape {list(emb.shape[:2])}, got {list(mask.shape)}")
        if not bool(mask[:, -1].all()):
            raise ArexportError("caption mask must be left-padded (the last position valid), as LlamaGen's T5 features are")
        return Conditions(embeds=emb, mask=mask)

    def generate(
        self,
        classes=None,
        captions=None,
        caption_mask=None,
        method: str = "ar",
        method_options: Optional[dict] = None,
        sampling: SamplingParams = SamplingParams(),
        seed: int = 0,
        seeds: Optional[Sequence[int]] = None,
        batch_size: int = 8,
        images: bool = True,
        timings: bool = True,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> GenerationResult:
        """Generate one image per condition. progress(done_tokens, total_tokens) is called as it goes.

        Image i uses the row seed image_seed(seed, i), or seeds[i] when per-image seeds are given
        (how a server keeps each merged request's own seeds)."""
        if batch_size < 1:
            raise ArexportError(f"batch size must be >= 1, got {batch_size}")
        conds = self.conditions(classes, captions, caption_mask)
        sampling.validate(self.spec.vocab_size)
        m = make_method(method, **(method_options or {}))
        if m.needs_draft and self.draft is None:
            raise ArexportError(f"method {method} needs a draft model: pass --draft NAME|DIR")
        n = len(conds)
        if seeds is None:
            seeds = [image_seed(seed, i) for i in range(n)]
        elif len(seeds) != n:
            raise ArexportError(f"got {len(seeds)} seeds for {n} images")
        seeds = [int(s) & ((1 << 62) - 1) for s in seeds]
        total = n * self.spec.n_tokens
        done = [0]

        def tick(k: int) -> None:
            done[0] += k
            if progress:
                progress(done[0], total)

        with self._lock:
            engines = [e for e in (self.engine, self.draft) if e is not None]
            for e in engines:
                e.calls.clear()
                e.records.clear()
                e.record_timings = timings
            t0 = time.perf_counter()
            tok_batches, img_batches, method_stats, n_batches = [], [], [], 0
            for start in range(0, n, batch_size):
                rows = slice(start, min(n, start + batch_size))
                rng = RowRNG.from_seeds(seeds[rows], self.engine.device)
                res = m.generate(self.engine, conds.select(rows), sampling, rng, progress=tick, draft=self.draft)
                tok_batches.append(res.tokens.cpu())
                method_stats.append(res.stats)
                if images:
                    img_batches.append(self.engine.decode_images(res.tokens).cpu())
                n_batches += 1
            seconds = time.perf_counter() - t0
            stats = self._stats(n, n_batches, seconds, method_stats)
        tokens = torch.cat(tok_batches).numpy()
        imgs = torch.cat(img_batches).numpy() if images else None
        return GenerationResult(tokens, imgs, stats)

    def _stats(self, n: int, n_batches: int, seconds: float, method_stats: list[dict]) -> dict[str, Any]:
        tf = self.engine.forward_count()
        df = self.draft.forward_count() if self.draft is not None else 0
        stats: dict[str, Any] = {
            "images": n,
            "batches": n_batches,
            "tokens_per_image": self.spec.n_tokens,
            "target_forwards": tf,
            "draft_forwards": df,
            "seconds": seconds,
            "seconds_per_image": seconds / n if n else 0.0,
            "backend": self.engine.backend,
            "device": str(self.engine.device),
            "calls": dict(self.engine.calls),
        }
        # Forward passes per image: a batched call serves every image in it.
        stats["target_forwards_per_image"] = tf / n_batches if n_batches else 0.0
        stats["step_compression"] = self.spec.n_tokens / stats["target_forwards_per_image"] if tf else 0.0
        latency: dict[str, Any] = {}
        for e, who in ((self.engine, "target"), (self.draft, "draft")):
            if e is None:
                continue
            kinds = sorted({r.kind for r in e.records})
            for k in kinds:
                secs = [r.seconds * 1e3 for r in e.records if r.kind == k]
                latency[f"{who}.{k}"] = {"count": len(secs), "mean_ms": float(np.mean(secs)), **{f"{q}_ms": v for q, v in percentiles(secs).items()}}
        stats["latency"] = latency
        merged: dict[str, Any] = {}
        for s in method_stats:
            for k, v in s.items():
                if isinstance(v, list):
                    merged.setdefault(k, []).extend(v)
                elif isinstance(v, (int, float)):
                    merged[k] = merged.get(k, 0) + v
        acc = merged.pop("accepted_lengths", None)
        per_row = merged.pop("forwards_per_row", None)
        for k in [k for k in merged if k.endswith("_per_row")]:
            v = merged.pop(k)
            stats[k[: -len("_per_row")] + "_per_image"] = float(np.mean(v)) if v else 0.0
        stats.update(merged)
        if per_row:
            # Forward passes one image needs on its own (prefill + the steps in which it was live),
            # independent of how it was batched: the machine-independent cost of a method.
            stats["forwards_per_image_alone"] = float(np.mean(per_row))
        if acc:
            stats["mean_accepted_length"] = float(np.mean(acc))
            values, counts = np.unique(np.asarray(acc), return_counts=True)
            stats["accepted_length_histogram"] = {int(v): int(c) for v, c in zip(values, counts)}
        stats["draft_forwards_per_image"] = df / n_batches if n_batches else 0.0
        return stats
