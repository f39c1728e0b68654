"""Fused operators for export: rotary embedding and RMS normalisation as single ONNX nodes.

Eager PyTorch always runs the plain arithmetic of `rope.apply_rope` and `llamagen.RMSNorm`. While
an exporter traces inside `fused_export()`, those call the custom ops below instead, which the
exporter translates to ONNX `RotaryEmbedding` (interleaved pairs) and `RMSNormalization` (opset 23):
one node each where the decomposed forms take 13 and 6, which on a small decode step is time
spent per node, not per byte. (For the same reason rotary runs on heads-first [B,H,L,D], so no
reshapes surround it, and an fp32 norm's weight is the op's scale rather than a Mul after it.)
ONNX Runtime runs both on every provider; TensorRT builds keep the decomposed forms (the parser's
operator list does not name these two).
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


@torch.library.custom_op("arexport::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B,H,L,D] fp32 with interleaved pairs rotated by cos/sin [B,L,D/2] (the same arithmetic as apply_rope)."""
    xs = x.unflatten(-1, (-1, 2))
    x0, x1 = xs[..., 0], xs[..., 1]
    c, s = cos[:, None], sin[:, None]
    return torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2)


@rotary.register_fake
def _rotary_fake(x, cos, sin):
    return torch.empty_like(x)


@torch.library.custom_op("arexport::rms_normalize", mutates_args=())
def rms_normalize(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * scale over the last axis, fp32 (scale [D]: the norm's weight, or
    ones where the weight must be applied after a cast)."""
    return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + eps) * scale


@rms_normalize.register_fake
def _rms_normalize_fake(x, scale, eps):
    return torch.empty_like(x)
