"""The KV-cache write as a custom op that exports to ONNX `TensorScatter` (opset 24).

Eager PyTorch runs it functionally (clone + scatter); the ONNX translation is a single
`TensorScatter(past, update, write_indices, axis=-2, mode="linear")` (the sequence axis of
[B, H, S, D], written -2: onnx-tensorrt's parser takes no other value), which ONNX Runtime updates
in place when one buffer is bound to both input and output, and which TensorRT >= 10.15 parses
into `IKVCacheUpdateLayer`. The dynamo exporter would otherwise turn an in-place `index_copy_` into a
copying ScatterND on a constant.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch

OPSET = 24
_op24 = onnxscript.values.Opset("", OPSET)  # onnxscript has no opset24 module yet


@torch.library.custom_op("arexport::kv_scatter", mutates_args=())
def kv_scatter(past: torch.Tensor, update: torch.Tensor, write_index: torch.Tensor) -> torch.Tensor:
    """present = past with update [B,H,q,D] written at slots write_index[b] .. + q (functional)."""
    b, h, q, d = update.shape
    out = past.clone()
    slots = write_index.view(b, 1, 1, 1) + torch.arange(q, device=update.device).view(1, 1, q, 1)
    out.scatter_(2, slots.expand(b, h, q, d), update.to(past.dtype))
    return out


@kv_scatter.register_fake
def _kv_scatter_fake(past, update, write_index):
    return torch.empty_like(past)


def kv_scatter_onnx(past, update, write_index):
    """ONNX translation of arexport::kv_scatter."""
    return _op24.TensorScatter(past, update, write_index, axis=-2, mode="linear")  # TensorRT accepts -2 only


def functional_cache_write(past: torch.Tensor, new: torch.Tensor, write_index: torch.Tensor) -> torch.Tensor:
    """Cache-write callback for the model's step function during export."""
    return torch.ops.arexport.kv_scatter(past, new.to(past.dtype), write_index)


def rotary_onnx(x, cos, sin):
    """ONNX translation of arexport::rotary: RotaryEmbedding on [B, H, L, D] with per-token cos/sin."""
    return _op24.RotaryEmbedding(x, cos, sin, interleaved=1)


def rms_normalize_onnx(x, scale, eps: float):
    """ONNX translation of arexport::rms_normalize: RMSNormalization over the last axis in fp32."""
    return _op24.RMSNormalization(x, scale, axis=-1, epsilon=eps, stash_type=1)


def group_norm_onnx(x, weight, bias, groups: int, eps: float, to: int):
    """ONNX translation of arexport::group_norm (exporter/groupnorm.py): LayerNormalization over the
    last axis of [N, G, C/G * spatial] in fp32 (a kernel on ONNX Runtime CUDA and in TensorRT; ONNX
    Runtime has none for GroupNormalization, and its InstanceNormalization kernels stop at opset 6),
    the per-channel affine in fp32, one Cast back to x's dtype (`to`)."""
    xf = _op24.Cast(x, to=1)
    grouped = _op24.Reshape(xf, _op24.Constant(value_ints=[0, groups, -1]))  # 0: keep N
    size = _op24.Slice(_op24.Shape(grouped), _op24.Constant(value_ints=[2]), _op24.Constant(value_ints=[3]))
    ones = _op24.ConstantOfShape(size, value=onnx.helper.make_tensor("one", onnx.TensorProto.FLOAT, [1], [1.0]))
    normed = _op24.LayerNormalization(grouped, ones, axis=-1, epsilon=eps, stash_type=1)[0]  # Y (mean, inv std unused)
    y = _op24.Reshape(normed, _op24.Shape(x))
    y = _op24.Add(_op24.Mul(y, _op24.Cast(weight, to=1)), _op24.Cast(bias, to=1))
    return _op24.Cast(y, to=to)


import arexport.exporter.groupnorm  # noqa: E402,F401  (defines arexport::group_norm)
import arexport.models.fused  # noqa: E402,F401  (defines the fused custom ops)

TRANSLATIONS = {torch.ops.arexport.kv_scatter.default: kv_scatter_onnx,
                torch.ops.arexport.rotary.default: rotary_onnx,
                torch.ops.arexport.rms_normalize.default: rms_normalize_onnx,
                torch.ops.arexport.group_norm.default: group_norm_onnx}
