"""Open a StepEngine from a model name (torch backend) or an engine directory (any backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from arexport.errors import ArexportError

BACKENDS = ("torch", "ort", "trt")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """'fp32' | 'fp16' | 'bf16' -> torch dtype (None stays None)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ArexportError(f"unknown precision {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def open_engine(
    source: str,
    backend: str = "torch",
    device: str = "cpu",
    checkpoint: Optional[str] = None,
    random_init: bool = False,
    seed: int = 0,
    overrides: Optional[dict] = None,
    image_size: Optional[int] = None,
    vq_checkpoint: Optional[str] = None,
    dtype: Optional[str] = None,
    cuda_graph: bool = False,
    **backend_options,
):
    """A StepEngine for `source`: an engine directory (has manifest.json) or a model name."""
    if backend not in BACKENDS:
        raise ArexportError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    _check_device(device)
    path = Path(source)
    if path.is_dir():
        from arexport.engines.directory import open_engine_dir

        return open_engine_dir(path, backend=backend, device=device, cuda_graph=cuda_graph, **backend_options)
    if (path.suffix or "/" in source) and not path.exists():
        raise ArexportError(f"engine directory not found: {source}")
    if backend != "torch":
        raise ArexportError(
            f"backend {backend} runs an engine directory; build one first: arexport build {source} --out DIR"
        )
    from arexport.models.registry import load_model
    from arexport.runtime.backends.torch_backend import TorchEngine

    loaded = load_model(
        source,
        checkpoint=checkpoint,
        random_init=random_init,
        seed=seed,
        overrides=overrides,
        image_size=image_size,
        vq_checkpoint=vq_checkpoint,
        dtype=parse_dtype(dtype) or torch.float32,
        device=device,
    )
    return TorchEngine(loaded, device=device, cuda_graph=cuda_graph)


def _check_device(device: str) -> None:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArexportError(f"device {device} requested but CUDA is not available on this machine")
