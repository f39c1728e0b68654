"""Loader of the `trt` backend: TensorRT plans of an engine directory, checked for this GPU and version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from arexport.errors import ArexportError
from arexport.format.profiles import select_profile
from arexport.format.versions import same_release


def check_plan_compat(trt_info: dict[str, Any], trt_version: str, gpu: dict[str, str]) -> None:
    """Refuse plans built with another TensorRT release or for another GPU architecture (a plan
    deserializes only in the TensorRT release that built it: versions compare as numbers, so a
    '.post1' repackaging of the same release is accepted)."""
    built = trt_info.get("version")
    if not built or not same_release(str(built), trt_version):
        raise ArexportError(f"TensorRT plans were built with TensorRT {built}, this machine has {trt_version}: rebuild with arexport build --backend trt")
    want = trt_info.get("gpu", {}).get("compute_capability")
    have = gpu.get("compute_capability")
    if want != have:
        raise ArexportError(
            f"TensorRT plans were built for {trt_info.get('gpu', {}).get('name')} (compute capability {want}), "
            f"this GPU is {gpu.get('name')} (compute capability {have}): rebuild on this GPU"
        )


class Plan:
    """A deserialized plan with one execution context per optimization profile."""

    def __init__(self, trt, runtime, path: Path, profiles: list[dict], stream: torch.cuda.Stream):
        blob = path.read_bytes()
        self.engine = runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise ArexportError(f"TensorRT could not deserialize {path} (corrupt, truncated, or built for another version/GPU)")
        self.profiles = profiles
        self.contexts = []
        for i in range(len(profiles)):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(i, stream.cuda_stream)
            self.contexts.append(ctx)
        stream.synchronize()
        self.aliases = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                src = self.engine.get_aliased_input_tensor(name)
                if src:
                    self.aliases[name] = src

    def profile_for(self, kind: str, batch: int, q: int) -> int:
        return select_profile(self.profiles, kind, batch, q)
