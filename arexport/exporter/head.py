"""An EAGLE draft head as its own small engine directory: the `draft_head` step kind exported to ONNX.

Layout (`HEAD_FORMAT`): `draft_head.onnx` (the declared step: hidden [B, q, dim], tokens, positions,
write_index, attn_mask and the head's per-layer cache -> logits, hidden_out and the updated cache), its
weights file, and `head.json` (the head's config in the released drafter's keys, the static cache length
`slots`, the query and batch limits, and the export check's errors). The ORT runner of such a directory is
`arexport.runtime.backends.ort.head`; `--draft-head DIR` picks it up, so the head runs beside any
backend's target without PyTorch modules on the hot path.

Inside an engine directory (`embed_head_engine`, `build-head --into ENGINE_DIR`) the same graph and weights
sit beside the target's files under names carrying a fresh tag (`draft_head-<tag>.onnx`, `draft_head-<tag>.bin`),
listed with their hashes in manifest.files, and head.json's content is the manifest's `draft_head` record. A
replaced head (`--overwrite`) is switched by the one atomic manifest write: the new files go in first under
new names, the manifest then names them, and only then are the old ones deleted, so an interrupted build
leaves either the old head or the new one, never a manifest naming half-written files.

Before the directory is written, the graph is run on ONNX Runtime against the PyTorch head on random
inputs (a tree-shaped mask, a cache already holding pairs) and refused beyond `TOLERANCE`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from arexport.errors import ArexportError

HEAD_FORMAT = "arexport-draft-head/2"  # 2: position -1 is the zero-rotary condition row (1 clamped it to cell 0)
HEAD_FILE = "head.json"
HEAD_WEIGHTS = "draft_head.bin"  # not the engine's weights.bin: the head can live beside a target's files
TOLERANCE = 1e-3  # max |ORT - torch| on the logits and hidden states (fp32)


def build_head_engine(source: str, out: str | Path, target_dim: int, target_vocab: int, grid_size: int, n_tokens: int,
                      lm_head: Optional[torch.Tensor] = None, max_q: int = 16, max_batch: int = 8,
                      extra_slots: int = 64, caption_pairs: int = 0, trt: Optional[dict] = None,
                      report=lambda s: None) -> dict:
    """Export the head named by `source` (as --draft-head reads it) for a target of width `target_dim`,
    vocabulary `target_vocab`, `n_tokens` image tokens (and, t2i, `caption_pairs` = caption length - 1 cache slots for
    the caption catch-up); `trt` (build_head_plan's options) adds a TensorRT plan; returns head.json's content. An existing `out` is
    refused, never replaced."""
    from arexport.fileio import atomic_directory

    with atomic_directory(out, report=report) as tmp:
        info = _export(source, tmp, target_dim, target_vocab, grid_size, n_tokens, lm_head, max_q, max_batch,
                       extra_slots, report, caption_pairs=caption_pairs)
        if trt is not None:
            info["tensorrt"] = build_head_plan(tmp, info, "draft_head.plan", report=report, **trt)
        (tmp / HEAD_FILE).write_text(json.dumps(info, indent=2))
    return info


def embed_head_engine(source: str, engine_dir: str | Path, lm_head: Optional[torch.Tensor] = None, max_q: int = 16,
                      max_batch: int = 8, extra_slots: int = 64, overwrite: bool = False, trt: Optional[dict] = None,
                      report=lambda s: None) -> dict:
    """Export the head named by `source` for the engine directory's own target (its manifest's spec) into that
    directory and record it as the manifest's `draft_head`; returns the record. An engine that already holds a
    head is refused unless `overwrite`; nothing else of the directory is touched."""
    import os
    import secrets
    import shutil
    import tempfile

    from arexport.fileio import atomic_write_json
    from arexport.format.manifest import MANIFEST, FileEntry, file_sha256, read_manifest, verify_files

    d = Path(engine_dir)
    manifest = read_manifest(d)
    verify_files(d, manifest)
    old = manifest.draft_head
    if old and not overwrite:
        raise ArexportError(f"{d} already holds a draft head (from {old.get('source')}): pass --overwrite to replace it")
    if manifest.quantization:
        raise ArexportError(f"{d} is a quantized engine ({manifest.quantization['mode']}): embed the head in its source "
                            "engine before calibrating (calibrate carries it over)")
    spec = manifest.spec
    tag = secrets.token_hex(4)
    names = {"graph": f"draft_head-{tag}.onnx", "weights": f"draft_head-{tag}.bin"}
    if trt is not None:
        names["plan"] = f"draft_head-{tag}.plan"
    for n in names.values():
        if (d / n).exists():
            raise ArexportError(f"{d / n} exists; nothing was written (run build-head again for a fresh tag)")
    tmp = Path(tempfile.mkdtemp(prefix=".draft_head.building.", dir=d))
    moved = []
    try:
        info = _export(source, tmp, spec.dim, spec.vocab_size, spec.grid_size, spec.n_tokens, lm_head, max_q, max_batch,
                       extra_slots, report, weights_file=names["weights"], caption_pairs=caption_pairs(spec))
        os.replace(tmp / info["graph"], tmp / names["graph"])
        info["graph"] = names["graph"]
        if trt is not None:
            info["tensorrt"] = build_head_plan(tmp, info, names["plan"], report=report, **trt)
        for n in names.values():
            os.replace(tmp / n, d / n)
            moved.append(d / n)
        for f in head_files(old):  # the replaced head's files leave the listing with it
            manifest.files.pop(f, None)
        for n in names.values():
            manifest.files[n] = FileEntry((d / n).stat().st_size, file_sha256(d / n))
        manifest.draft_head = info
        atomic_write_json(d / MANIFEST, manifest.to_json())
        moved = []  # the manifest names them now
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for f in moved:  # an error before the manifest named them: the directory is as it was
            f.unlink(missing_ok=True)
    if old:  # no longer named by the manifest
        for f in head_files(old):
            if f not in names.values():
                (d / f).unlink(missing_ok=True)
        report(f"replaced the draft head from {old.get('source')}")
    return info


def _export(source, tmp: Path, target_dim, target_vocab, grid_size, n_tokens, lm_head, max_q, max_batch, extra_slots,
            report, weights_file: str = HEAD_WEIGHTS, caption_pairs: int = 0) -> dict:
    """Export and check the head's graph into `tmp` (graph + weights files); returns the head.json record."""
    from arexport.exporter.export import WeightStore, export_step_kind
    from arexport.format.stepkinds import get_step_kind
    from arexport.models.eagle import load_eagle_head
    from arexport.models.fused import fused_export

    if not (1 <= max_q <= 256 and 1 <= max_batch <= 1024 and 0 <= extra_slots <= 4096):
        raise ArexportError(f"draft head engine: --verify-len {max_q} (1..256), batch {max_batch} (1..1024) and "
                            f"--extra-slots {extra_slots} (0..4096) out of range")
    head = load_eagle_head(source, target_dim=target_dim, target_vocab=target_vocab, lm_head=lm_head,
                           grid_size=grid_size).float().eval()
    slots = caption_pairs + n_tokens + extra_slots
    spec = head.spec(slots)
    kind = get_step_kind("draft_head")
    store = WeightStore(tmp, filename=weights_file)
    try:
        report(f"exporting the draft_head step graph (q up to {max_q}, {slots} cache slots)")
        with fused_export():  # RotaryEmbedding / RMSNormalization nodes, one q/k/v and one gate/up MatMul (models/eagle.py)
            g = export_step_kind(head, kind, spec, tmp, store, torch.float32, max_q=max(max_q, kind.min_max_q),
                                 max_batch=max_batch)
    finally:
        store.close()
    err = _check(head, tmp / g.file, slots, min(max_q, 4))
    if max(err.values()) > TOLERANCE:
        raise ArexportError(f"the exported draft head differs from the PyTorch head by {max(err.values()):.2e} "
                            f"(> {TOLERANCE}): {err}")
    from arexport.format.coverage import check_graph

    targets = {t: [f.line() for f in check_graph(tmp / g.file, t, "draft_head")] for t in ("cuda", "trt")}
    for t, lines in targets.items():
        report(f"draft_head on --target {t}: " + ("; ".join(lines) if lines else "every node supported"))
    return {"format": HEAD_FORMAT, "graph": g.file, "weights": store.filename, "config": head.cfg.to_official(),
            "slots": slots, "max_q": max_q, "max_batch": max_batch, "n_tokens": n_tokens, "source": _source_name(source),
            "check": {"max_abs_error": err, "tolerance": TOLERANCE}, "targets": targets}


def build_head_plan(directory: Path, info: dict, plan_file: str, opt_level: int = 3, workspace_gb: Optional[float] = None,
                    timing_cache: Optional[str] = None, report=lambda s: None) -> dict:
    """A TensorRT plan of the head graph `info["graph"]` in `directory`, through the engine builder's own path
    (exporter/trt_build.py: strongly typed, the step kind's declared profile: rows 1..max_batch, pairs 1..max_q);
    returns the record head.json / the manifest's `draft_head` keeps under "tensorrt". Needs TensorRT and a GPU
    (BackendUnavailable says which is missing); a graph node TensorRT's parser does not take is refused first."""
    from types import SimpleNamespace

    from arexport.devices import current_gpu, require_tensorrt
    from arexport.exporter.trt_build import _build_one
    from arexport.format.coverage import check_graph
    from arexport.format.profiles import step_profiles

    trt = require_tensorrt()
    bad = [f.line() for f in check_graph(directory / info["graph"], "trt", "draft_head") if f.severity in ("fail", "fallback")]
    if bad:
        raise ArexportError("TensorRT cannot import the draft head graph: " + "; ".join(bad))
    import onnx

    m = onnx.load(str(directory / info["graph"]), load_external_data=False)
    inputs = [{"name": v.name, "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
              for v in m.graph.input]
    profiles = step_profiles([int(info["max_batch"])], int(info["max_q"]), "draft_head")
    opts = SimpleNamespace(trt_opt_level=opt_level, trt_workspace_gb=workspace_gb, trt_timing_cache=timing_cache)
    report(f"TensorRT: {info['graph']} with {len(profiles)} profile(s)")
    _build_one(trt, trt.Logger(trt.Logger.WARNING), directory / info["graph"], directory / plan_file, inputs, profiles,
               opts, Path(timing_cache) if timing_cache else None)
    return {"plan": plan_file, "version": trt.__version__, "gpu": current_gpu(), "profiles": profiles, "strongly_typed": True}


def head_files(info: Optional[dict]) -> list[str]:
    """The files a head record names: graph, weights and (built with --backend trt) its plan."""
    if not info:
        return []
    return [f for f in (info.get("graph"), info.get("weights"), (info.get("tensorrt") or {}).get("plan")) if f]


def caption_pairs(spec) -> int:
    """Head cache slots a target's condition fills before the first round: a t2i caption of T positions leaves T - 1
    pairs (the last one is the first round's catch-up; runtime/methods/eagle.py `_caption_catch_up`)."""
    return max(spec.cond_len - 1, 0) if spec.model_type == "t2i" else 0


def _source_name(source: str) -> str:
    """A packaged head's name, else the absolute path: `arexport verify --draft-head` reloads it from here."""
    from arexport.models.eagle import PACKAGED_HEADS

    return source if source in PACKAGED_HEADS else str(Path(source).resolve())


def _check(head, path: Path, slots: int, q: int) -> dict:
    """Max abs error of the ORT graph against the PyTorch head: 2 rows, q new pairs after some committed
    ones, the first row under a causal mask, the second seeing only every other new pair (a tree level)."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(0)
    c = head.cfg
    b = 2
    hidden = torch.randn(b, q, c.dim, generator=g)
    tokens = torch.randint(0, c.vocab_size, (b, q), generator=g)
    write = torch.tensor([3, 7])
    positions = write[:, None] + torch.arange(q)[None, :]
    s = torch.arange(slots)
    mask = (s[None, None, :] <= positions[:, :, None]).clone()
    mask[1] &= ~((s[None, :] >= write[1]) & ((s[None, :] - write[1]) % 2 == 1) & (s[None, :] < write[1] + q - 1))
    mask = mask[:, None]
    keys, values = head.allocate(b, slots)
    for t in keys + values:
        t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    feeds = {"hidden": hidden.numpy(), "tokens": tokens.numpy(), "positions": positions.numpy(),
             "write_index": write.numpy(), "attn_mask": mask.numpy()}
    for i, (k, v) in enumerate(zip(keys, values)):
        feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = k.numpy().copy(), v.numpy().copy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, out = sess.run(["logits", "hidden_out"], feeds)
    with torch.no_grad():
        ref_logits, ref_out, _, _ = head.step(hidden, tokens, positions, write, mask, keys, values)
    return {"logits": float(np.abs(logits - ref_logits.numpy()).max()), "hidden": float(np.abs(out - ref_out.numpy()).max())}
