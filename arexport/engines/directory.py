"""Open an engine directory on a backend, after validating its manifest and files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from arexport.engines.manifest import read_manifest, spec_of, verify_files
from arexport.errors import ArexportError


def open_engine_dir(directory: str | Path, backend: str = "ort", device: str = "cpu", verify_hashes: bool = True, **options):
    """A StepEngine for an engine directory: ort, trt, or torch (rebuilt from the recorded source)."""
    d = Path(directory)
    manifest = read_manifest(d)
    verify_files(d, manifest, check_hashes=verify_hashes)
    spec = spec_of(manifest)
    if backend == "ort":
        from arexport.runtime.backends.ort_backend import OrtEngine

        return OrtEngine(d, manifest, spec, device=device, **options)
    if backend == "trt":
        from arexport.runtime.backends.trt_backend import TrtEngine

        return TrtEngine(d, manifest, spec, device=device, **options)
    if backend == "torch":
        return torch_engine_from_manifest(manifest, device=device, **options)
    raise ArexportError(f"unknown backend {backend!r}")


def torch_engine_from_manifest(manifest: dict[str, Any], device: str = "cpu", cuda_graph: bool = False):
    """The PyTorch reference for an engine directory, rebuilt from the weights source it records."""
    from arexport.models.registry import load_model
    from arexport.runtime.backends.torch_backend import TorchEngine
    from arexport.runtime.loading import DTYPES

    src = manifest.get("source", {})
    kw: dict[str, Any] = dict(overrides=src.get("overrides") or None, image_size=src.get("image_size"))
    if "checkpoint" in src:
        if not Path(src["checkpoint"]).exists():
            raise ArexportError(f"the engine was built from {src['checkpoint']}, which no longer exists; the torch reference needs it")
        kw["checkpoint"] = src["checkpoint"]
    elif "random_init_seed" in src:
        kw.update(random_init=True, seed=src["random_init_seed"])
    if src.get("vq_checkpoint"):
        kw["vq_checkpoint"] = src["vq_checkpoint"]
    loaded = load_model(src["model"], dtype=DTYPES[manifest["precision"]], device=device, **kw)
    if "vq_decoder" not in manifest.get("graphs", {}):
        loaded.decoder = None  # mirror the engine: it was built without images
    return TorchEngine(loaded, device=device, cuda_graph=cuda_graph)
