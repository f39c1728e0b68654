"""Open a StepEngine from a model name (torch backend) or an engine directory (any backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from arexport.devices import check_device
from arexport.errors import ArexportError
from arexport.format.manifest import read_manifest, verify_files
from arexport.runtime.backends import BACKENDS, backend_package, open_directory


def open_engine(source: str, backend: str = "torch", device: str = "cpu", dtype: Optional[str] = None,
                cuda_graph: bool = False, verify_hashes: bool = True, **options):
    """A StepEngine for `source`: an engine directory (has manifest.json) or a model name.

    For a model name `options` are the model's weight options (checkpoint, random_init, seed,
    overrides, image_size, vq_checkpoint); for a directory they go to the backend's loader
    (ort: threads)."""
    if backend not in BACKENDS:
        raise ArexportError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "trt":  # TensorRT's loader says first whether TensorRT and a GPU are there at all
        check_device(device)
    path = Path(source)
    if path.is_dir():
        manifest = read_manifest(path)
        verify_files(path, manifest, check_hashes=verify_hashes)
        kw = dict(options, precision=dtype) if backend == "torch" and dtype else options
        return open_directory(backend, path, manifest, device=device, cuda_graph=cuda_graph, **kw)
    if (path.suffix or "/" in source) and not path.exists():
        raise ArexportError(f"engine directory not found: {source}")
    if backend != "torch":
        raise ArexportError(f"engine directory not found: {source} (backend {backend} runs an engine directory; if "
                            f"{source} is a model name, build one first: arexport build {source} --out DIR)")
    return backend_package("torch").open_model(source, device=device, dtype=dtype, cuda_graph=cuda_graph, **options)
