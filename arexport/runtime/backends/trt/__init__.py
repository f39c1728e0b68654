"""TensorRT backend: loader.py (plans, compatibility checks), runner.py (execute_async_v3, CUDA graphs).

`open_directory` joins them here, so the runner imports the loader and never the other way round.
"""

from __future__ import annotations

from pathlib import Path

import torch

from arexport.devices import current_gpu, require_tensorrt, torch_dtype
from arexport.errors import ArexportError
from arexport.runtime.backends.trt.loader import Plan, check_plan_compat
from arexport.runtime.backends.trt.runner import TrtEngine


def open_directory(directory: Path, manifest, device="cuda", cuda_graph: bool = False):
    """A TrtEngine over the directory's plans (refused for another GPU or TensorRT version)."""
    trt = require_tensorrt()
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ArexportError("the TensorRT backend runs on a CUDA device: pass --device cuda")
    info = manifest.tensorrt
    if not info:
        raise ArexportError(f"{directory} has no TensorRT plans: rebuild with arexport build --backend trt")
    check_plan_compat(info, trt.__version__, current_gpu(dev.index or 0))
    stream = torch.cuda.Stream(dev)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    plans = {p["graph"]: Plan(trt, runtime, Path(directory) / f, p["profiles"], stream) for f, p in info["plans"].items()}
    return TrtEngine(Path(directory), manifest, dev, torch_dtype(manifest.precision), plans, stream, cuda_graph)
