"""fp32 islands in half-precision decoder graphs, placed by the support tables.

A decoder exported in fp16 or bf16 may hold nodes ONNX Runtime's CUDA provider has no kernel for
in that dtype (1.27: bf16 Resize, ReduceL2 and Clip; format/support/ort_cuda.json) but has one for
in fp32. `add_fp32_islands` wraps exactly those nodes in Casts (half inputs to fp32, fp32 outputs
back to the node's dtype), so the graph stays on the GPU instead of falling back to the CPU
provider, and returns what it did: one record per op with the table's reason. Nodes whose fp32
form has no kernel either are left alone (the build's target check then refuses the graph, naming
them). The Casts are exact for Resize in nearest mode and Clip; ReduceL2 and bicubic Resize then
compute in fp32, which is at least as accurate as the half computation they replace.
"""

from __future__ import annotations

import collections

import onnx
from onnx import TensorProto, defs, helper

from arexport.format.coverage import _nodes, _ort_kernel, load_table

HALF = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


def add_fp32_islands(model: onnx.ModelProto) -> list[dict]:
    """Rewrite `model` in place: each node with no ONNX Runtime CUDA kernel for its half dtype but one
    for fp32 runs in fp32 between Casts. Returns [{'op', 'dtype', 'nodes', 'why'}] per (op, dtype)."""
    cuda = load_table("cuda")
    done: dict[tuple[str, str], dict] = {}
    typed = _nodes(model)
    new_nodes = []
    for n, proto in zip(typed, list(model.graph.node)):
        halves = {t for ts in n.bound.values() for t in ts if t in HALF}
        why = _ort_kernel(cuda, n) if halves else None
        if why is None or _ort_kernel(cuda, n, {p: ["float" if t in HALF else t for t in ts] for p, ts in n.bound.items()}):
            new_nodes.append(proto)
            continue
        schema = defs.get_schema(n.op, n.opset, "" if n.domain == "ai.onnx" else n.domain)
        types = dict(n.tensors)

        def formal(formals, j):
            return formals[min(j, len(formals) - 1)].type_str if formals else None

        for j, name in enumerate(proto.input):
            if name and types.get(name) in HALF and formal(schema.inputs, j) in n.bound:
                cast = f"{name}__fp32_{proto.name or len(new_nodes)}"
                new_nodes.append(helper.make_node("Cast", [name], [cast], to=TensorProto.FLOAT, name=f"{cast}_cast"))
                proto.input[j] = cast
        after = []
        for j, name in enumerate(proto.output):
            if name and types.get(name) in HALF and formal(schema.outputs, j) in n.bound:
                inner = f"{name}__fp32"
                proto.output[j] = inner
                after.append(helper.make_node("Cast", [inner], [name], to=HALF[types[name]], name=f"{name}_cast_back"))
        new_nodes += [proto] + after
        dtype = sorted(halves)[0]
        rec = done.setdefault((n.op, dtype), {"op": n.op, "dtype": dtype, "nodes": 0, "why": why})
        rec["nodes"] += 1
    if done:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        # value_info of rewired tensors would now name the wrong type: drop it, shape inference redoes it
        del model.graph.value_info[:]
    return sorted(done.values(), key=lambda r: (r["op"], r["dtype"]))


def count_ops(model: onnx.ModelProto) -> dict[str, int]:
    """op type -> node count of a graph (the Cast counts docs/gpu.md reports)."""
    return dict(collections.Counter(n.op_type for n in model.graph.node))
