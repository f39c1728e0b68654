"""An exported EAGLE draft head (`arexport build-head`, arexport.exporter.head) run on ONNX Runtime.

`OrtDraftHead` offers what the eagle decoders call on a PyTorch head (`cfg.dim`, `dtype`, `allocate`,
`step`), so `--draft-head DIR` works beside any backend's target with no PyTorch module on the hot path.
The graph's cache length is static (`slots` in head.json): `allocate` hands out buffers of exactly that
length and refuses a decoder that needs more. The cache is written in place, as the target's OrtEngine
writes its own (runner.py): each K/V buffer the caller passes is bound through IOBinding as both `past_*`
input and `present_*` output, so the graph's TensorScatter writes the new pairs into it and nothing copies
the cache per call (the earlier runner fed it in as numpy and copied the `present_*` outputs back; the
before/after is in docs/benchmarks.md, "issue 30: the exported head's cache in place"). Bindings are the
runner's `_StaticIO`, one per (feed shapes, cache buffer addresses), least recently used dropped first.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections import OrderedDict
from types import SimpleNamespace
from typing import Optional

import torch

from arexport.errors import ArexportError

# what arexport.exporter.head writes; 2: position -1 is the zero-rotary condition row (1 clamped it to cell 0)
HEAD_FORMAT = "arexport-draft-head/2"
HEAD_FILE = "head.json"
# heads narrower than this run on one intra-op thread unless told otherwise (`default_head_threads`)
SMALL_HEAD_WIDTH = 512


ENGINE_MANIFEST = "manifest.json"  # an engine directory's; its `draft_head` record is head.json's content


def is_head_directory(path: str) -> bool:
    """A head directory (head.json) or an engine directory holding a head (`build-head --into`)."""
    return (Path(path) / HEAD_FILE).is_file() or embedded_head(path) is not None


def embedded_head(path) -> Optional[dict]:
    """The `draft_head` record of an engine directory's manifest (None: not an engine directory, or no head)."""
    m = Path(path) / ENGINE_MANIFEST
    if not m.is_file():
        return None
    try:
        head = json.loads(m.read_text()).get("draft_head")
    except (OSError, ValueError, AttributeError):
        return None
    return head if isinstance(head, dict) else None


def read_head_info(d: Path, label: str) -> dict:
    """A head directory's head.json (written by `arexport build-head`), or an engine directory's embedded head
    record (`build-head --into`); `label` names the directory in errors."""
    if not (d / HEAD_FILE).is_file() and (d / ENGINE_MANIFEST).is_file():
        info = embedded_head(d)
        if info is None:
            raise ArexportError(f"{label} {d}: this engine directory holds no draft head (embed one with "
                                f"`arexport build-head HEAD --into {d}`)")
    else:
        try:
            info = json.loads((d / HEAD_FILE).read_text())
        except (OSError, ValueError) as e:
            raise ArexportError(f"{label} {d}: not a head directory from `arexport build-head` (no readable {HEAD_FILE}: {e})") from None
    if info.get("format") != HEAD_FORMAT:
        raise ArexportError(f"{label} {d}: format {info.get('format')!r}, expected {HEAD_FORMAT}")
    return info


def check_head_target(info: dict, d, spec) -> None:
    """Refuse, in one line naming both, a head built for another target than `spec` (width, vocabulary, image tokens)."""
    c = info.get("config", {})
    built = (c.get("hidden_size"), c.get("vocab_size"), info.get("n_tokens"))
    if built != (spec.dim, spec.vocab_size, spec.n_tokens):
        raise ArexportError(f"draft head {d} was built for a target of width {built[0]}, vocabulary {built[1]} and "
                            f"{built[2]} image tokens; {spec.name} has {spec.dim}, {spec.vocab_size} and {spec.n_tokens}")


def head_limits(info: dict, d, target_dim: int, target_vocab: int) -> tuple:
    """An exported head's (cfg: dim, n_layer, n_kv_head, head_dim, vocab_size; cache slots; max pairs per call; max
    rows) from its head record, refused in one line when its width or vocabulary is not the target's. Shared by the
    ONNX Runtime and TensorRT head runners."""
    c = info["config"]
    cfg = SimpleNamespace(dim=int(c["hidden_size"]), n_layer=int(c.get("num_hidden_layers", 1)),
                          n_kv_head=int(c.get("num_key_value_heads") or c["num_attention_heads"]),
                          head_dim=int(c["hidden_size"]) // int(c["num_attention_heads"]), vocab_size=int(c["vocab_size"]))
    if cfg.dim != target_dim:
        raise ArexportError(f"draft head {d} has width {cfg.dim}; the target's hidden state has width {target_dim}")
    if cfg.vocab_size != target_vocab:
        raise ArexportError(f"draft head {d} has a vocabulary of {cfg.vocab_size}; the target's is {target_vocab}")
    return cfg, int(info["slots"]), int(info["max_q"]), int(info["max_batch"])


def allocate_head_cache(head, batch: int, slots: int, device) -> tuple:
    """Zeroed per-layer K and V buffers [batch, H_kv, head.slots, D] on `device` for an exported head (ORT or
    TensorRT), after checking the caller's `slots` and `batch` against the limits the head was built with."""
    if slots > head.slots:
        raise ArexportError(f"the decoder needs {slots} draft-head cache slots; this exported head has {head.slots}: "
                            "rebuild it with a larger --extra-slots")
    if batch > head.max_batch:
        raise ArexportError(f"{batch} rows exceed the exported draft head's batch limit {head.max_batch}: rebuild it "
                            "with larger --batch-sizes")
    shape = (batch, head.cfg.n_kv_head, head.slots, head.cfg.head_dim)
    mk = lambda: torch.zeros(shape, device=device)  # noqa: E731
    return [mk() for _ in range(head.cfg.n_layer)], [mk() for _ in range(head.cfg.n_layer)]


def default_head_threads(dim: int) -> Optional[int]:
    """The head session's intra-op threads when the caller names none: 1 for a head narrower than SMALL_HEAD_WIDTH,
    else None (ONNX Runtime's default, one per core). A narrow head's call (the demo's: width 96, ~0.1 M multiply-adds
    per pair) is far too small to split: a second thread only adds its hand-off (docs/benchmarks.md, issue 30 eagle30w: per demo
    image, draft CPU 14.7 -> 12.4 ms and wall 15.4 -> 13.1 ms, medians, 2 threads -> 1); a released head (width 1024-2048, a 16384-code
    output layer, ~20-35 M multiply-adds per pair) has work each core can share, so it keeps ORT's default."""
    return 1 if dim < SMALL_HEAD_WIDTH else None


class OrtDraftHead:
    """A draft-head directory's ONNX Runtime session; tensors in and out are torch on `device` (CPU).
    threads: the session's intra-op threads (None: `default_head_threads` of the head's width); `self.threads`
    holds what was set (None: ORT's default)."""

    def __init__(self, directory: str, target_dim: int, target_vocab: int, device: str = "cpu", threads: Optional[int] = None):
        from arexport.runtime.backends.ort.loader import _ort

        d = Path(directory)
        info = read_head_info(d, "draft head directory")
        if torch.device(device).type != "cpu":
            raise ArexportError(f"an exported draft head runs on ONNX Runtime's CPU provider here, not {device}: pass the "
                                "head's .safetensors file or released directory to run it in PyTorch on that device")
        self.cfg, self.slots, self.max_q, self.max_batch = head_limits(info, d, target_dim, target_vocab)
        self.dtype = torch.float32
        ort = _ort()
        opts = ort.SessionOptions()
        opts.log_severity_level = 2  # warnings and above, as the target's sessions: an in-place fallback is visible
        if threads is not None and threads < 1:
            raise ArexportError(f"draft-head threads must be >= 1, got {threads}")
        self.threads = threads if threads is not None else default_head_threads(self.cfg.dim)
        if self.threads:
            opts.intra_op_num_threads = self.threads
        # no spinning, as the target's CPU sessions (ort/loader.py): idle workers held the cores between calls
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(d / info["graph"]), opts, providers=["CPUExecutionProvider"])
        self.static: "OrderedDict[tuple, object]" = OrderedDict()  # launch key -> runner._StaticIO
        self._run_options = ort.RunOptions()
        self.calls = 0

    MAX_STATIC = 64  # launches kept bound: a round's tree levels and catch-ups take a few (rows, q) shapes per cache

    def _static_io(self, feeds: dict, keys, values):
        """The standing binding of these feed shapes and cache buffers (made on first use)."""
        from arexport.runtime.backends.ort.runner import _StaticIO

        key = (tuple((n, tuple(t.shape), t.dtype) for n, t in feeds.items()),
               tuple(t.data_ptr() for t in keys), tuple(t.data_ptr() for t in values), tuple(keys[0].shape))
        entry = self.static.get(key)
        if entry is not None:
            self.static.move_to_end(key)
            return entry
        for t in (*keys, *values):
            if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or tuple(t.shape) != tuple(keys[0].shape):
                raise ArexportError("the exported draft head writes its cache in place: pass the contiguous fp32 CPU buffers "
                                    f"its allocate() made (or row slices of them), not {t.dtype} {tuple(t.shape)} on {t.device}")
        b, q = feeds["tokens"].shape
        outputs = {"logits": ((b, q, self.cfg.vocab_size), torch.float32), "hidden_out": ((b, q, self.cfg.dim), torch.float32)}
        shapes = {n: t.contiguous() for n, t in feeds.items()}  # the fixed buffers are dense (a feed may be a view)
        entry = _StaticIO(self.session, SimpleNamespace(keys=keys, values=values), shapes, outputs, torch.device("cpu"),
                          self._run_options)
        self.static[key] = entry
        while len(self.static) > self.MAX_STATIC:
            self.static.popitem(last=False)
        return entry

    def allocate(self, batch: int, slots: int):
        """Zeroed per-layer K and V buffers [batch, H_kv, self.slots, D]; `slots` is what the caller needs."""
        return allocate_head_cache(self, batch, slots, torch.device("cpu"))

    def step(self, hidden, tokens, positions, write_index, attn_mask, keys, values):
        """As EagleHead.step: (logits [B,q,V] fp32, out hidden [B,q,dim], keys, values), K/V written in place."""
        q = tokens.shape[1]
        if q > self.max_q:
            raise ArexportError(f"a draft-head call of {q} pairs exceeds the exported head's limit {self.max_q}: rebuild "
                                "it with a larger --verify-len")
        feeds = {"hidden": hidden.detach().float(), "tokens": tokens.long(), "positions": positions.long(),
                 "write_index": write_index.long(), "attn_mask": attn_mask.bool()}
        outs = self._static_io(feeds, keys, values).run(feeds)  # copies the feeds in, runs, returns output copies
        self.calls += 1
        return outs["logits"], outs["hidden_out"], keys, values
