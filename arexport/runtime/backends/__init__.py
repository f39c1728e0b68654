"""Backends behind the StepEngine interface, each a package with a loader and a runner.

Like Polygraphy's `backend/<framework>/{loader,runner}.py`: the *loader* reads and validates what
the backend needs from an engine directory (sessions and plans are created lazily), the *runner* is
the StepEngine that executes steps. Backends are looked up by name and imported on demand, so
running an ORT engine imports neither TensorRT nor the PyTorch model definitions.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from arexport.errors import ArexportError

BACKENDS = ("torch", "ort", "trt")


def backend_package(name: str):
    """A backend's package (`open_directory(directory, manifest, device, **options)`; torch also `open_model`)."""
    if name not in BACKENDS:
        raise ArexportError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(f"arexport.runtime.backends.{name}")


def open_directory(name: str, directory: Path, manifest, device: str = "cpu", **options):
    """A StepEngine of backend `name` over an engine directory whose manifest was read and verified."""
    return backend_package(name).open_directory(Path(directory), manifest, device=device, **options)
