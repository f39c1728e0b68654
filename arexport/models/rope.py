"""2D rotary position embedding as LlamaGen computes it (interleaved pairs, fp32)."""

from __future__ import annotations

import torch

from arexport.models.fused import fused


def rope_table_2d(grid_size: int, head_dim: int, base: float = 10000.0):
    """cos, sin tables [1 + grid_size**2, head_dim/2] fp32.

    Row 0 is the condition position (all zeros, which zeroes q and k of condition tokens, exactly as
    LlamaGen's zero-padded `freqs_cis`); row 1 + (r * grid + c) is grid cell (r, c). Half of the
    rotary pairs rotate with the row index and half with the column index.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    t = torch.arange(grid_size, dtype=torch.float32)
    f = torch.outer(t, freqs)  # [grid, half/2]
    grid = torch.cat(
        [f[:, None, :].expand(-1, grid_size, -1), f[None, :, :].expand(grid_size, -1, -1)], dim=-1
    ).reshape(grid_size * grid_size, half)
    zeros = torch.zeros(1, half)
    return torch.cat([zeros, torch.cos(grid)]), torch.cat([zeros, torch.sin(grid)])


def rotary_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an engine's RotaryEmbedding node runs in for a model of `dtype`: fp16 rotates in
    fp16 (its logits stay as close to the fp32 model as the fp32 rotation's), bf16 in fp32: bf16
    cos/sin rows (8-bit mantissa) and products measured up to twice the fp32 rotation's logit error
    on the demo (tests/test_gpu_path.py), so q and k are cast to fp32 around it."""
    return torch.float16 if dtype == torch.float16 else torch.float32


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B,H,L,D] (heads first, as attention takes it) by cos/sin
    [B,L,1,D/2]; math in fp32, result in x's dtype (an engine's fused node rotates in rotary_dtype)."""
    if fused():  # tracing an engine: one RotaryEmbedding node in rotary_dtype (models/fused.py)
        b, _, l, d = x.shape
        dt = rotary_dtype(x.dtype)
        out = torch.ops.arexport.rotary(x.to(dt), cos.to(dt).reshape(b, l, d // 2), sin.to(dt).reshape(b, l, d // 2))
        return out.to(x.dtype)
    cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xs[..., 0], xs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).type_as(x)
