"""Quantized engine directories with ONNX Runtime's quantization tools (explicit Q/DQ graphs).

Modes (the step graph, and every other step graph fed exactly the step's inputs, such as the tree-verification
graph, whose hidden-state outputs EAGLE heads read: quantized with the same captured samples, so
its MatMuls get the step's scales and it verifies on the model `ar` decodes with; the image decoder and
condition prefills, hidden or not, are copied as is):
* `int8`  — static QDQ INT8 (`quantize_static`): symmetric per-channel weights, activations
  calibrated with MinMax on the captured step inputs. Activations are symmetric int8 by default
  (`activations="s8"`, zero point 0, what TensorRT requires); `activations="u8"` makes asymmetric
  uint8 activations, which ONNX Runtime's CPU provider fuses into integer MatMuls (S8S8 QDQ
  is executed there as dequantize + float MatMul, several times slower — see docs/benchmarks.md).
* `fp8`   — static QDQ FP8 E4M3 (`quantize_static`, Distribution calibration, as ORT requires).
* `int4-weight` — 4-bit block-wise weight-only (`MatMulNBitsQuantizer` in QDQ format:
  DequantizeLinear(int4, block) -> MatMul), symmetric, block 32 (or the largest power of two <= 128
  dividing the input width).
Only MatMul weights are quantized; RMSNorm, softmax/attention, the KV-cache writes and the output
head stay in the engine's precision. Q/DQ graphs are what TensorRT 11 takes precision from, and
ONNX Runtime's CPU provider runs them too. (NVIDIA ModelOpt was considered: its ONNX extra pins
onnx~=1.21 and onnxruntime-gpu~=1.24, which conflict with the opset-24 stack this project uses.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from arexport.errors import ArexportError

MODES = ("int8", "fp8", "int4-weight")
ORT_TYPES = {1: np.float32, 10: np.float16, 7: np.int64, 9: np.bool_}


def input_dtypes(model_path: Path) -> dict[str, Any]:
    """The graph's input names -> numpy dtype (None for types numpy has no exact match for)."""
    m = onnx.load(str(model_path), load_external_data=False)
    return {i.name: ORT_TYPES.get(i.type.tensor_type.elem_type) for i in m.graph.input}


def cast_to_inputs(sample: dict[str, np.ndarray], dtypes: dict[str, Any]) -> dict[str, np.ndarray]:
    """A captured sample as feeds of the graph: only its inputs, cast to their dtypes."""
    return {k: v.astype(dtypes[k]) if dtypes[k] is not None else v for k, v in sample.items() if k in dtypes}


class StepDataReader:
    """ORT CalibrationDataReader over captured step inputs (dtypes cast to the graph's inputs)."""

    def __init__(self, samples: list[dict[str, np.ndarray]], model_path: Path):
        self.types = input_dtypes(model_path)
        self.samples = samples
        self._it = iter(self.samples)

    def get_next(self):
        s = next(self._it, None)
        return None if s is None else cast_to_inputs(s, self.types)

    def rewind(self):
        self._it = iter(self.samples)


def head_matmul(model_path: Path) -> list[str]:
    """Names of the MatMul nodes that produce the `logits` output (through casts/reshapes)."""
    m = onnx.load(str(model_path), load_external_data=False)
    producer = {o: n for n in m.graph.node for o in n.output}
    found, frontier, seen = [], ["logits"], set()
    while frontier:
        name = frontier.pop()
        node = producer.get(name)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "MatMul":
            found.append(node.name)
            continue
        if node.op_type in ("Cast", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Transpose"):
            frontier += list(node.input)
    return found


def _block_size(model_path: Path) -> int:
    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name: i for i in m.graph.initializer}
    widths = [inits[n.input[1]].dims[0] for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    for b in (128, 64, 32, 16):
        if all(w % b == 0 for w in widths):
            return b
    return 16


def quantize_step_graph(src: Path, dst: Path, mode: str, samples: list[dict[str, np.ndarray]],
                        activations: str = "s8") -> dict[str, Any]:
    """Write a quantized copy of the step graph `src` (with its external weights) to `dst`."""
    if mode not in MODES:
        raise ArexportError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    import onnxruntime as ort

    # The calibrator runs the graph without IOBinding, so ORT would warn about copying the cache at
    # every TensorScatter; that is expected here and not the runtime path.
    ort.set_default_logger_severity(3)
    import logging

    root = logging.getLogger()  # the ORT quantizer logs "please pre-process" and per-node INFO on the root logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return _quantize(src, dst, mode, samples, activations)
    finally:
        ort.set_default_logger_severity(2)
        root.setLevel(level)


def _quantize(src: Path, dst: Path, mode: str, samples, activations: str) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    exclude = head_matmul(src)
    info: dict[str, Any] = {"mode": mode, "excluded_nodes": exclude, "tool": "onnxruntime.quantization"}
    if mode in ("int8", "fp8"):
        if activations not in ("s8", "u8"):
            raise ArexportError(f"int8 activations must be s8 or u8, got {activations!r}")
        wtype = QuantType.QInt8 if mode == "int8" else QuantType.QFLOAT8E4M3FN
        atype = wtype if mode == "fp8" or activations == "s8" else QuantType.QUInt8
        method = CalibrationMethod.MinMax if mode == "int8" else CalibrationMethod.Distribution
        # ORT's histogram calibrator (fp8's Distribution method) print()s its progress: not for our users
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(str(src), str(dst), StepDataReader(samples, src), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul"], per_channel=(mode == "int8"), activation_type=atype,
                            weight_type=wtype, nodes_to_exclude=exclude, use_external_data_format=True,
                            calibrate_method=method,
                            extra_options={"ActivationSymmetric": atype != QuantType.QUInt8, "WeightSymmetric": True})
        info.update(calibration=method.name, per_channel=mode == "int8", activation_type=atype.name, weight_type=wtype.name)
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        block = _block_size(src)
        q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=block, is_symmetric=True,
                                 nodes_to_exclude=exclude, quant_format=QuantFormat.QDQ, op_types_to_quantize=("MatMul",))
        q.process()
        onnx.save_model(q.model.model, str(dst), save_as_external_data=True, location=dst.name + ".data")
        info.update(block_size=block, bits=4, symmetric=True)
    m = onnx.load(str(dst), load_external_data=False)
    info["qdq_nodes"] = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)
    return info


def same_feed_graphs(manifest) -> list[str]:
    """Step graphs besides `step` whose declared inputs are the step's own (such as the tree-verification graph): the captured
    step samples are valid feeds of theirs, so they are quantized on the same samples (identical MatMul inputs,
    hence identical MinMax scales, on the same layers)."""
    kinds = manifest.step_graphs()
    feeds = [io.name for io in kinds["step"].inputs]
    return [name for name, kind in kinds.items() if name != "step" and [io.name for io in kind.inputs] == feeds]


def build_quantized_dir(src_dir: Path, out_dir: Path, mode: str, samples, tmpdir: Path,
                        activations: str = "s8") -> tuple[dict[str, Any], dict]:
    """Quantize src_dir's step graph (and the step graphs `same_feed_graphs` names) and assemble the new engine
    directory's files in tmpdir.

    Returns (quantization info, graphs section); info["graphs"] has each further quantized graph's own info.
    Other graphs and arrays are re-packed unchanged.
    """
    from arexport.exporter.export import WeightStore, pack_graph
    from arexport.format.manifest import read_manifest

    manifest = read_manifest(src_dir)
    with tempfile.TemporaryDirectory() as work:
        raw = {"step": Path(work) / "model.q.onnx"}
        info = quantize_step_graph(src_dir / manifest.step.file, raw["step"], mode, samples, activations)
        info["graphs"] = {}
        for name in same_feed_graphs(manifest):
            raw[name] = Path(work) / f"{name}.q.onnx"
            info["graphs"][name] = quantize_step_graph(src_dir / manifest.graphs[name].file, raw[name], mode, samples,
                                                       activations)
        store = WeightStore(tmpdir)
        try:
            graphs = {}
            for name, g in manifest.graphs.items():
                source = raw.get(name, src_dir / g.file)
                pack_graph(source, tmpdir / g.file, store)
                graphs[name] = dataclasses.replace(g)
        finally:
            store.close()
    for name in manifest.arrays.values():
        shutil.copy2(src_dir / name, tmpdir / name)
    info["weights_bytes"] = store.unique_bytes
    return info, graphs
