"""Capture real step inputs while decoding with the engine itself: a reusable calibration set.

A `CapturingEngine` wraps the engine directory's own ONNX Runtime engine; every n-th call of a
step kind whose declaration says `calibrate` records the step graph's full input — its declared
feeds (tokens, positions, write_index, attn_mask, ...) and the K/V buffers as they were before the
step — exactly the feed ONNX Runtime's calibrators need.

Why the directory's graphs and not the PyTorch reference rebuilt from the manifest's weight source:
the graphs hold the weights the engine was built from. A rebuild from a recorded seed gives other
weights whenever the model was changed after it was loaded (a test's scaled random-weight model), and
the set would then hold the activations, and the K/V history, of another model than the one quantized. Samples are saved
one `.npz` per step with a manifest (engine identity, classes, method, file hashes); the set's
hash goes into the manifest of every engine quantized from it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arexport.errors import ArexportError
from arexport.fileio import atomic_directory, atomic_write_json
from arexport.format.manifest import file_sha256
from arexport.runtime.engine import StepEngine

CALIB_FORMAT = "arexport-calibration"


class CapturingEngine(StepEngine):
    """Delegates to `inner`; records every `every`-th step's inputs (and the cache before it)."""

    def __init__(self, inner: StepEngine, every: int = 4, limit: int = 1 << 30):
        super().__init__(inner.spec, inner.device, inner.cache_dtype, max_q=inner.max_q)
        self.inner, self.every, self.limit = inner, every, limit
        self.samples: list[dict[str, np.ndarray]] = []
        self._n = 0
        self.fixed_slots = inner.spec.s_max  # capture the cache at the engine graph's length
        self.live_masks = inner.live_masks  # masks as the graph takes them (narrowed to the live bound or not)

    def _record(self, cache, feeds: dict[str, torch.Tensor]) -> None:
        self._n += 1
        if self._n % self.every or len(self.samples) >= self.limit:
            return
        s = {k: v.detach().cpu().numpy().copy() for k, v in feeds.items()}
        for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
            s[f"past_key_{i}"] = k.detach().float().cpu().numpy().copy()
            s[f"past_value_{i}"] = v.detach().float().cpu().numpy().copy()
        self.samples.append(s)

    def step_kinds(self):
        return self.inner.step_kinds()

    def _forward(self, kind, cache, feeds):
        if kind.calibrate:  # the declaration says whether its feeds are a calibration sample
            self._record(cache, {k: v.to("cpu") for k, v in feeds.items()})
        return self.inner._forward(kind, cache, feeds)

    def _decode_images(self, tokens):
        return self.inner._decode_images(tokens)

    def codebook(self):
        return self.inner.codebook()

    def null_caption(self):
        return self.inner.null_caption()


def capture_set(engine_dir: str | Path, out: str | Path, classes: list[int], method: str = "ar", every: int = 4,
                samples: int = 64, seed: int = 0) -> dict[str, Any]:
    """Decode `classes` with `engine_dir`'s own step graphs (ONNX Runtime, CPU), keep up to `samples` step inputs."""
    from arexport.format.manifest import read_manifest
    from arexport.runtime.backends import open_directory
    from arexport.runtime.generator import Generator

    manifest = read_manifest(engine_dir)
    own = open_directory("ort", Path(engine_dir), manifest)  # the weights in the graphs (see the module docstring)
    cap = CapturingEngine(own, every=every, limit=samples)
    method = method if method in cap.family.methods else cap.family.default_method
    Generator(cap).generate(classes=classes, method=method, seed=seed, batch_size=max(1, len(classes)),
                            images=False, timings=False)
    if not cap.samples:
        raise ArexportError("no step inputs were captured: use more classes or a smaller --every")
    with atomic_directory(out, overwrite=True) as tmp:
        files = {}
        for i, s in enumerate(cap.samples):
            name = f"sample_{i:04d}.npz"
            np.savez(tmp / name, **s)
            files[name] = file_sha256(tmp / name)
        m = {"format": CALIB_FORMAT, "version": 1, "model": manifest.spec.name,
             "weights_sha256": _weights_id(manifest), "classes": list(map(int, classes)), "method": method,
             "every": every, "samples": len(cap.samples), "files": files, "hash": _set_hash(files)}
        atomic_write_json(tmp / "manifest.json", m)
    return m


def load_set(path: str | Path, manifest) -> tuple[dict[str, Any], list[dict[str, np.ndarray]]]:
    """A saved calibration set (validated against the engine it is meant for) and its samples."""
    p = Path(path)
    mp = p / "manifest.json"
    if not mp.exists():
        raise ArexportError(f"{p} is not a calibration set (no manifest.json)")
    m = json.loads(mp.read_text())
    if m.get("format") != CALIB_FORMAT:
        raise ArexportError(f"{p}: unknown calibration set format {m.get('format')!r}")
    if m.get("weights_sha256") != _weights_id(manifest):
        raise ArexportError(f"calibration set {p} was captured for other weights ({m.get('model')}); capture a new one")
    out = []
    for name, digest in m["files"].items():
        f = p / name
        if not f.exists() or file_sha256(f) != digest:
            raise ArexportError(f"calibration set {p}: {name} is missing or modified")
        with np.load(f) as z:
            out.append({k: z[k] for k in z.files})
    return m, out


def _weights_id(manifest) -> str:
    src = manifest.source
    key = json.dumps({k: src.get(k) for k in ("model", "overrides", "checkpoint_sha256", "random_init_seed", "packaged")},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def _set_hash(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{k}:{v}" for k, v in sorted(files.items())).encode()).hexdigest()
