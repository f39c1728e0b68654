"""Backends behind the StepEngine interface, each a package with a loader and a runner.

Like Polygraphy's `backend/<framework>/{loader,runner}.py`: the *loader* reads and validates what
the backend needs from an engine directory (sessions and plans are created lazily), the *runner* is
the StepEngine that executes steps. Backends are registered here
(`BACKENDS`: what each one is and does differently, read by the loader, the Generator and the CLI
instead of comparing names) and imported on demand, so running an ORT engine imports neither
TensorRT nor the PyTorch model definitions.

"Backend" is what *runs* an engine (torch, ort, trt). What `arexport build --format` writes
(onnx graphs, or trt: onnx plus TensorRT plans) is the engine's format, not a backend.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from arexport.errors import ArexportError


@dataclass(frozen=True)
class Backend:
    """A registered run-time backend: its package and how it differs from the others."""

    name: str
    help: str  # one line for --help and docs
    runs_model_names: bool = False  # opens a model name (packaged or checkpoint weights), not only an engine directory
    checks_device: bool = True  # the generic device check runs first (TensorRT's loader says itself what is missing)
    precision_from_dtype: bool = False  # --dtype picks the precision it runs an engine directory at
    cpu_host_threads: Optional[int] = None  # torch intra-op threads for the runtime's own work next to it on a CPU

    @property
    def package(self):
        """The backend's package (`open_directory(directory, manifest, device, **options)`; torch also `open_model`)."""
        return importlib.import_module(f"arexport.runtime.backends.{self.name}")


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("torch", "PyTorch (the reference model; also runs model names)", runs_model_names=True,
            precision_from_dtype=True),
    Backend("ort", "ONNX Runtime (CPU or CUDA) over an engine directory", cpu_host_threads=1),
    Backend("trt", "TensorRT plans of an engine directory (built with --format trt)", checks_device=False),
)}


def get_backend(name: str) -> Backend:
    """The registered backend `name`; unknown names are a one-line error listing the known ones."""
    if name not in BACKENDS:
        raise ArexportError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def backend_package(name: str):
    """A backend's package (see Backend.package)."""
    return get_backend(name).package


def open_directory(name: str, directory: Path, manifest, device: str = "cpu", **options):
    """A StepEngine of backend `name` over an engine directory whose manifest was read and verified."""
    return backend_package(name).open_directory(Path(directory), manifest, device=device, **options)
