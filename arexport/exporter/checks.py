"""Graph checks run after every export, and the graph report printed by `arexport build`/`inspect`.

Checks: the ONNX checker; no control flow (`If`, `Loop`, `Scan`: they block CUDA graphs and often
TensorRT); no operators with data-dependent output shapes; every output dimension is static or a
named input dimension; every operator is one the TensorRT ONNX parser imports.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from arexport.errors import ArexportError

CONTROL_FLOW = {"If", "Loop", "Scan", "SequenceMap"}
DATA_DEPENDENT_SHAPES = {"NonZero", "Unique", "Compress", "NonMaxSuppression", "StringSplit", "TopK_dynamic"}

# Operators the TensorRT 10.x ONNX parser imports (default domain). Source: onnx/onnx-tensorrt
# docs/operators.md ("Operator Support Matrix", TensorRT 10.x), plus `Attention` (parser 10.14 GA
# release notes: "Added support for the Attention operator") and `TensorScatter` (parsed into
# IKVCacheUpdateLayer since TensorRT 10.15, see ../shared/DESIGN.md §2). Ops listed as "N" there
# (BitShift, ConvInteger, Hardmax, MatMulInteger, Multinomial, NonZero is DDS, Sequence*, String*,
# TfIdfVectorizer, ...) are deliberately absent.
TRT_SUPPORTED = {
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "Attention",
    "AveragePool", "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace", "DequantizeLinear", "Div",
    "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather",
    "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater",
    "GreaterOrEqual", "GroupNormalization", "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization", "IsInf",
    "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "LpNormalization",
    "LpPool", "LRN", "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul",
    "Neg", "Not", "OneHot", "Or", "Pad", "Pow", "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike",
    "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu",
    "Reshape", "Resize", "ReverseSequence", "Round", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink",
    "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split",
    "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "TensorScatter", "ThresholdedRelu", "Tile", "TopK", "Transpose",
    "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
}


@dataclass
class GraphReport:
    """What a graph contains and whether it passed the checks."""

    file: str
    nodes: int
    op_histogram: dict[str, int]
    initializers: int
    parameters: int
    external_bytes: int
    graph_bytes: int
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _dims(vi) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in vi.type.tensor_type.shape.dim]


def io_signature(vi) -> dict:
    """{'name', 'dtype', 'shape'} of a graph value (symbolic dims as strings)."""
    return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
            if vi.type.tensor_type.elem_type != onnx.TensorProto.BFLOAT16 else "bfloat16", "shape": _dims(vi)}


def check_graph(path: str | os.PathLike, require_trt: bool = True) -> GraphReport:
    """Run every check on an exported graph; problems are listed in the report (not raised)."""
    path = Path(path)
    problems: list[str] = []
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as e:  # checker raises ValidationError and others
        problems.append(f"onnx checker: {str(e).splitlines()[0]}")
    model = onnx.load(str(path), load_external_data=False)
    hist = collections.Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph.node)
    for op in sorted(set(hist) & CONTROL_FLOW):
        problems.append(f"control flow operator {op} (blocks CUDA graphs and TensorRT)")
    for op in sorted(set(hist) & DATA_DEPENDENT_SHAPES):
        problems.append(f"operator {op} has a data-dependent output shape")
    if require_trt:
        for op in sorted(set(hist) - TRT_SUPPORTED):
            problems.append(f"operator {op} is not imported by the TensorRT ONNX parser")
    input_dims = {d for vi in model.graph.input for d in _dims(vi) if isinstance(d, str)}
    for vi in model.graph.output:
        for d in _dims(vi):
            if isinstance(d, str) and d not in input_dims:
                problems.append(f"output {vi.name} has a dimension {d!r} not fixed by the inputs (data-dependent shape)")
            if d == 0:
                problems.append(f"output {vi.name} has an unknown dimension")
    params = 0
    ext = 0
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        params += n
        if init.data_location == onnx.TensorProto.EXTERNAL:
            ext += int({e.key: e.value for e in init.external_data}.get("length", 0))
    return GraphReport(
        file=path.name,
        nodes=len(model.graph.node),
        op_histogram=dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0]))),
        initializers=len(model.graph.initializer),
        parameters=params,
        external_bytes=ext,
        graph_bytes=path.stat().st_size,
        inputs=[io_signature(vi) for vi in model.graph.input],
        outputs=[io_signature(vi) for vi in model.graph.output],
        problems=problems,
    )


def raise_on_problems(report: GraphReport) -> None:
    """Refuse a graph that failed a check, naming every problem."""
    if report.problems:
        raise ArexportError(f"{report.file} failed graph checks: " + "; ".join(report.problems))
