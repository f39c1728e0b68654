"""GroupNorm for export as nodes ONNX Runtime's CUDA provider and TensorRT both have kernels for.

The dynamo exporter writes `nn.GroupNorm` as one `GroupNormalization` (opset 21) node. ONNX Runtime
1.27 registers no kernel for it on any provider (format/support/ort_cuda.json), so it inlines the
ONNX function body: about a dozen small nodes per norm, some of them CPU-only in bf16. Inside
`export_group_norms(module)` every `nn.GroupNorm` of the module traces instead as the custom op
`arexport::group_norm`, which the exporter translates (exporter/ops.py) into

    Cast(x -> fp32) -> Reshape [N, G, -1] -> LayerNormalization over the last axis (unit scale, eps)
      -> Reshape [N, C, ...] -> Mul(weight [C, 1, ..]) -> Add(bias) -> Cast(-> x's dtype)

ONNX Runtime 1.27's CUDA provider has a LayerNormalization-17 kernel (fp32/fp16/bf16) and TensorRT
10.15 imports it; InstanceNormalization would not do: its CUDA kernel is registered for opset 6
only and ORT serves an open-ended kernel to nodes of exactly that version (opset-24 graphs hold
InstanceNormalization-22). The statistics and the affine run in fp32 whatever the engine's precision: an fp16 sum of
squares over a group (C/G * H * W values, 16 * 256 * 256 at a 256 px decoder's last level) would
overflow, and torch's own half `group_norm` also computes in fp32 and rounds once at the end, which
this does too (tests/test_half_decoders.py compares it with `F.group_norm` in fp32, fp16 and bf16).
The two Casts per norm are the one fp32 island a half decoder keeps by choice (docs/gpu.md).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

# x's dtype as the ONNX TensorProto code the translation casts the result back to
ONNX_DTYPE = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16}


@torch.library.custom_op("arexport::group_norm", mutates_args=())
def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float, to: int) -> torch.Tensor:
    """x [N, C, *] normalised over each of `groups` channel groups, then scaled by weight and shifted
    by bias ([C, 1, ...], any float dtype), all in fp32, rounded once to x's dtype (`to` is that
    dtype's ONNX code, for the translation)."""
    w, b = weight.reshape(-1).float(), bias.reshape(-1).float()
    return F.group_norm(x.float(), groups, w, b, eps).to(x.dtype)


@group_norm.register_fake
def _group_norm_fake(x, weight, bias, groups, eps, to):
    return torch.empty_like(x)


def _forward(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (x.dim() - 2)  # per-channel affine broadcast over the spatial axes
    c = norm.num_channels
    w = norm.weight if norm.affine else x.new_ones(c)
    b = norm.bias if norm.affine else x.new_zeros(c)
    return torch.ops.arexport.group_norm(x, w.reshape(shape), b.reshape(shape), norm.num_groups, norm.eps,
                                         ONNX_DTYPE[x.dtype])


@contextlib.contextmanager
def export_group_norms(module: nn.Module):
    """Within this block every nn.GroupNorm inside `module` runs (and traces) as arexport::group_norm;
    the instances' own forward is restored afterwards."""
    norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
    for m in norms:
        m.forward = (lambda x, m=m: _forward(m, x))
    try:
        yield len(norms)
    finally:
        for m in norms:
            del m.forward
