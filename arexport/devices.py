"""Device facts shared by the exporter and the runtime: CUDA checks and the TensorRT import guard."""

from __future__ import annotations

from arexport.errors import ArexportError, BackendUnavailable

MIN_TRT = (10, 15)  # TensorScatter -> IKVCacheUpdateLayer
MAX_TRT = (12, 0)  # the [trt] extra's range: the 10.15..11.x Python API this code uses


def require_tensorrt():
    """Import tensorrt or raise BackendUnavailable saying why."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(
            "TensorRT is not installed (pip install 'arexport[trt]' on a machine with an NVIDIA GPU and driver); "
            f"import failed: {e}"
        ) from None
    import re

    m = re.match(r"(\d+)\.(\d+)", trt.__version__)  # numbers: '10.9' < '10.15'
    ver = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if ver < MIN_TRT:
        raise BackendUnavailable(f"TensorRT {trt.__version__} is too old: the KV-cache TensorScatter needs >= {'.'.join(map(str, MIN_TRT))}")
    if ver >= MAX_TRT:
        raise BackendUnavailable(f"TensorRT {trt.__version__} is newer than this code was written for "
                                 f"(< {'.'.join(map(str, MAX_TRT))}): install 'arexport[trt]'")
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs a CUDA GPU, and torch sees none on this machine")
    return trt


def current_gpu(device_index: int = 0) -> dict[str, str]:
    """{'name', 'compute_capability'} of a CUDA device."""
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    return {"name": torch.cuda.get_device_name(device_index), "compute_capability": f"{major}.{minor}"}


def check_device(device: str) -> None:
    """Refuse a device string torch does not understand, or CUDA where there is none."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ArexportError(f"unknown device {device!r}: use cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise ArexportError(f"unknown device {device!r}: use cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArexportError(f"device {device} requested but CUDA is not available on this machine")


PRECISIONS = ("fp32", "fp16", "bf16")


def torch_dtype(precision: str):
    """'fp32' | 'fp16' | 'bf16' -> the torch dtype; a named error otherwise."""
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in table:
        raise ArexportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return table[precision]


def precision_of(dtype) -> str:
    """The precision name of a torch dtype (inverse of torch_dtype)."""
    for p in PRECISIONS:
        if torch_dtype(p) == dtype:
            return p
    raise ArexportError(f"no precision name for dtype {dtype}")
