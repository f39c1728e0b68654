"""Open a StepEngine from a model name (torch backend) or an engine directory (any backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from arexport.devices import check_device
from arexport.errors import ArexportError
from arexport.format.manifest import read_manifest, verify_files
from arexport.runtime.backends import BACKENDS, get_backend, open_directory


def open_engine(source: str, backend: str = "torch", device: str = "cpu", dtype: Optional[str] = None,
                cuda_graph: bool = False, verify_hashes: bool = True, **options):
    """A StepEngine for `source`: an engine directory (has manifest.json) or a model name.

    For a model name `options` are the model's weight options (checkpoint, random_init, seed,
    overrides, image_size, vq_checkpoint); for a directory they go to the backend's loader
    (ort: threads)."""
    b = get_backend(backend)
    if b.checks_device:  # else its loader says first whether what it needs (TensorRT and a GPU) is there at all
        check_device(device)
    path = Path(source)
    if path.is_dir():
        manifest = read_manifest(path)
        verify_files(path, manifest, check_hashes=verify_hashes)
        kw = dict(options, precision=dtype) if b.precision_from_dtype and dtype else options
        return open_directory(backend, path, manifest, device=device, cuda_graph=cuda_graph, **kw)
    if (path.suffix or "/" in source) and not path.exists():
        raise ArexportError(f"engine directory not found: {source}")
    if not b.runs_model_names:
        names = ", ".join(n for n, x in BACKENDS.items() if x.runs_model_names)
        raise ArexportError(f"engine directory not found: {source} (backend {backend} runs an engine directory; if "
                            f"{source} is a model name, build one first: arexport build {source} --out DIR, or run it "
                            f"with backend {names})")
    return b.package.open_model(source, device=device, dtype=dtype, cuda_graph=cuda_graph, **options)
