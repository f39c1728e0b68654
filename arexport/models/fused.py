"""Fused operators for export: rotary embedding and RMS normalisation as single ONNX nodes.

Eager PyTorch always runs the plain arithmetic of `rope.apply_rope` and `llamagen.RMSNorm`. While
an exporter traces inside `fused_export()`, those call the custom ops below instead, which the
exporter translates to ONNX `RotaryEmbedding` (interleaved pairs) and `RMSNormalization` (opset 23):
one node each where the decomposed forms take 13 and 6, which on a small decode step is time
spent per node, not per byte. (For the same reason rotary runs on heads-first [B,H,L,D], so no
reshapes surround it, and the norm's weight is the op's scale rather than a Mul after it.)

Precision (issue 29 item 6): RMSNormalization takes fp16/bf16 x and weight with stash_type=1: the mean of squares and the
normalisation are computed in fp32, rounded to the model dtype and then scaled by the weight, which
is LlamaGen's `_norm(x.float()).type_as(x) * weight` exactly. RotaryEmbedding runs in
`rope.rotary_dtype`: fp16 models rotate in fp16 with no Cast per layer (the fp32 tables' gathered
rows are cast once per graph), bf16 models rotate in fp32 with q and k cast in and out, because bf16
rows and products measurably worsen the logits (tests/test_gpu_path.py). ONNX Runtime 1.27 has CUDA
kernels for both in fp16 and bf16 and CPU kernels in fp16; onnx-tensorrt 10.15 imports both
(format/support/*.json).

Live slots (issue 35): `live_slots(cache, mask)` is the part of a static cache [B, H, S, D] that a
step's attention reads, slots [0, L) with L the mask's last dim (L = S unless narrowed: default builds
export masks as wide as the cache and no Slice). For engines built with `--live-attention` the runtime
hands step graphs masks only as wide as the live bound of the call (`runtime.engine.live_width`: the last slot any row can see,
rounded up to a bucket), so attention reads L slots rather than the whole buffer S. Eager PyTorch
takes a view (free); an exported graph gets one `Slice(present, 0, Shape(mask)[-1], axis=2)` per cache
tensor after its TensorScatter, whose end is a shape, not data, so TensorRT profiles and CUDA graphs
(one per bucket) hold. Every slot in [L, S) is masked out for every query, so the result is the same
attention (bit-identical on the CPU kernels tested: tests/test_live_attention.py).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

_FUSED = contextvars.ContextVar("arexport_fused_export", default=False)


@contextlib.contextmanager
def fused_export(enabled: bool = True):
    """Within this block the model's rotary embedding and RMS norms trace as the fused custom ops."""
    token = _FUSED.set(enabled)
    try:
        yield
    finally:
        _FUSED.reset(token)


def fused() -> bool:
    return _FUSED.get()


def live_slots(cache: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """cache [B, H, S, D] -> its first L slots [B, H, L, D], L = mask.shape[-1] (mask [B, 1, q, L], L <= S):
    the only slots the mask lets any query see (see the module docstring)."""
    return cache[:, :, : mask.shape[-1]]


@torch.library.custom_op("arexport::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B,H,L,D] with interleaved pairs rotated by cos/sin [B,L,D/2], all in x's dtype (the ONNX
    node's arithmetic; apply_rope's eager path rotates in fp32)."""
    xs = x.unflatten(-1, (-1, 2))
    x0, x1 = xs[..., 0], xs[..., 1]
    c, s = cos[:, None], sin[:, None]
    return torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2)


@rotary.register_fake
def _rotary_fake(x, cos, sin):
    return torch.empty_like(x)


@torch.library.custom_op("arexport::rms_normalize", mutates_args=())
def rms_normalize(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """(x * rsqrt(mean(x^2) + eps)) computed in fp32, rounded to x's dtype, times scale [D] (x's dtype:
    the norm's weight) over the last axis: RMSNormalization with stash_type=1."""
    xf = x.float()
    return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + eps)).to(x.dtype) * scale


@rms_normalize.register_fake
def _rms_normalize_fake(x, scale, eps):
    return torch.empty_like(x)
