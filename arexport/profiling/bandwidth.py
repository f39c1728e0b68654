"""The memory-bandwidth floor of a step: bytes it must read, over the copy bandwidth measured on the
same device in the same run.

A batch-1 decode step of an AR transformer is memory-bound: it must read every weight used by the
step once (all linear layers, norms and the output head; embedding tables only for the gathered
rows, negligible) and the live part of the KV cache (K and V of every layer for the committed
tokens). Bandwidth is measured like STREAM's copy kernel: bytes read plus bytes written by a large
device-to-device copy, per second. floor = bytes to read / bandwidth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from arexport.format.spec import ModelSpec

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "fp8": 1, "int4": 0.5}


@dataclass
class StepBytes:
    """Bytes one step must read."""

    weights: float
    kv: float

    @property
    def total(self) -> float:
        return self.weights + self.kv


def step_bytes(spec: ModelSpec, weight_precision: str, cache_precision: str, rows: int, live_tokens: float,
               weight_params: int | None = None) -> StepBytes:
    """Weights + live KV bytes for one step over `rows` rows with `live_tokens` cached slots each."""
    params = weight_params if weight_params is not None else int(spec.extra.get("step_weight_params", 0))
    if params <= 0:
        raise ValueError("the model spec does not record step_weight_params")
    kv = 2 * spec.n_cache_layers * rows * spec.n_kv_head * live_tokens * spec.head_dim * DTYPE_BYTES[cache_precision]
    return StepBytes(weights=params * DTYPE_BYTES[weight_precision], kv=kv)


def mean_live_tokens(spec: ModelSpec) -> float:
    """Average cached slots over the decode steps of one image: cond_len + (n_tokens - 1) / 2."""
    return spec.cond_len + (spec.n_tokens - 1) / 2


def measure_copy_bandwidth(device: str | torch.device = "cpu", mib: int = 256, repeats: int = 5) -> float:
    """Best-of-`repeats` device copy bandwidth in bytes/s (read + written bytes, STREAM-style)."""
    dev = torch.device(device)
    n = mib * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def floor_seconds(nbytes: float, bandwidth: float) -> float:
    """Time to read nbytes at a bandwidth measured as read+write bytes/s (a read-only stream of
    nbytes moves nbytes, so the floor is nbytes / bandwidth)."""
    return nbytes / bandwidth
