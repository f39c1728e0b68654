"""Which nodes of an engine's graphs each execution target runs, from kernel/parser support tables.

The tables (support/*.json, built by scripts/build_support_tables.py) record, for the minimum
supported versions: the kernels ONNX Runtime's CPU and CUDA execution providers register (op,
domain, opset range, type constraints) and the operators, types and opset range the TensorRT ONNX
parser imports. `check_graph` looks every node up:

* ONNX Runtime picks a kernel whose start version equals the node's since-version, or whose closed
  range contains it (an open-ended kernel `N+` serves only nodes of since-version N), and whose type
  constraints hold for the node's actual input/output types. No CUDA kernel: the node falls back to
  the CPU provider (copies across PCIe; CUDA graphs cannot capture the session). No kernel at all:
  the session fails to load, unless the op is an ONNX function, which ONNX Runtime inlines into its
  body (then many small nodes run instead of one).
* TensorRT parses an op listed "Y" at an opset in its range with each type-parameter tensor of a
  listed type; UINT8 only as a network input or output.

Findings name the graph, node, op and reason; severities: `fail` (will not load or parse),
`fallback` (runs, but on the CPU provider), `inlined` (a function expanded into smaller nodes),
`upcast` (CPU: a float16 node run in float32 between Casts ONNX Runtime inserts).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, defs

from arexport.errors import ArexportError

TARGETS = ("cpu", "cuda", "trt")
TABLES = {"cpu": "ort_cpu.json", "cuda": "ort_cuda.json", "trt": "trt.json"}
SUPPORT_DIR = Path(__file__).parent / "support"


class TargetUnsupported(ArexportError):
    """A graph the chosen execution target would not load, parse or keep on the GPU."""


@dataclass(frozen=True)
class Finding:
    graph: str
    node: str
    op: str
    severity: str  # fail | fallback | inlined | upcast
    reason: str

    def line(self) -> str:
        return f"{self.graph}: {self.op} {self.node!r} [{self.severity}] {self.reason}"


@functools.lru_cache(maxsize=None)
def load_table(target: str) -> dict:
    """The support table of `target` (cpu, cuda, trt) as JSON."""
    if target not in TABLES:
        raise ArexportError(f"unknown inspect target {target!r}; choose {', '.join(TARGETS)}")
    return json.loads((SUPPORT_DIR / TABLES[target]).read_text())


def table_versions() -> dict[str, str]:
    """target -> 'what version, from where' of each table."""
    out = {}
    for t in TARGETS:
        tab = load_table(t)
        out[t] = f"{tab.get('onnxruntime') or 'TensorRT ' + str(tab.get('tensorrt'))}: {tab['source']}"
    return out


_NAMES = {TensorProto.FLOAT: "float", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
          TensorProto.DOUBLE: "double", TensorProto.INT64: "int64", TensorProto.INT32: "int32", TensorProto.INT16: "int16",
          TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.UINT16: "uint16", TensorProto.UINT32: "uint32",
          TensorProto.UINT64: "uint64", TensorProto.BOOL: "bool", TensorProto.STRING: "string"}


@dataclass
class _Node:
    name: str
    op: str
    domain: str
    since: int | None  # the schema version the node's opset import selects (None: no schema known)
    function: bool  # the schema has a function body ONNX Runtime can inline
    bound: dict[str, list[str]]  # type parameter -> actual types of the tensors bound to it
    data_param: str | None  # the type parameter of the first input (what TensorRT's "Supported Types" lists)
    tensors: list[tuple[str, str]]  # (tensor name, actual type) of every input and output
    proto: object = None  # the NodeProto
    opset: int = 0  # the node domain's opset import
    in_types: tuple = ()  # actual type of each input ("" for an omitted optional input)


def _nodes(model: onnx.ModelProto) -> list[_Node]:
    """Each node with its schema version and the actual type of every tensor (from ONNX type inference)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    types: dict[str, str] = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = _NAMES.get(vi.type.tensor_type.elem_type, str(vi.type.tensor_type.elem_type))
    for init in g.initializer:
        types[init.name] = _NAMES.get(init.data_type, str(init.data_type))
    for n in g.node:  # Constant outputs are not always in value_info
        if n.op_type == "Constant" and n.output[0] not in types:
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = _NAMES.get(a.t.data_type, str(a.t.data_type))
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    out = []
    for i, n in enumerate(g.node):
        domain = n.domain or "ai.onnx"
        schema = None
        try:
            schema = defs.get_schema(n.op_type, opsets.get(domain, 1), "" if domain == "ai.onnx" else domain)
        except Exception:  # an op ONNX has no schema for (a contrib op): matched by name only
            pass
        bound: dict[str, list[str]] = {}
        tensors = []
        first = schema.inputs[0].type_str if schema and schema.inputs else None
        for names, formals in ((n.input, schema.inputs if schema else []), (n.output, schema.outputs if schema else [])):
            for j, name in enumerate(names):
                if not name:
                    continue
                t = types.get(name, "?")
                tensors.append((name, t))
                if formals:
                    f = formals[min(j, len(formals) - 1)]
                    if f.type_str and not f.type_str.startswith(("tensor(", "seq(")):
                        bound.setdefault(f.type_str, []).append(t)
        out.append(_Node(n.name or f"#{i}", n.op_type, domain, schema.since_version if schema else None,
                         bool(schema and (schema.has_function or schema.has_context_dependent_function)), bound,
                         first if first in bound else None, tensors, n, opsets.get(domain, 1),
                         tuple(types.get(x, "?") if x else "" for x in n.input)))
    return out


_ELEM = {v: k for k, v in _NAMES.items()}


def _body(n: _Node) -> list[_Node] | None:
    """The nodes ONNX Runtime inlines for function op `n` (its schema's function body for the node's
    attributes and input types), typed; None when there is no body to expand."""
    try:
        schema = defs.get_schema(n.op, n.opset, "" if n.domain == "ai.onnx" else n.domain)
        if schema.has_context_dependent_function:
            types = [onnx.helper.make_tensor_type_proto(_ELEM.get(t, TensorProto.FLOAT), None).SerializeToString()
                     for t in n.in_types]
            fn = onnx.FunctionProto()
            fn.ParseFromString(schema.get_context_dependent_function_with_opset_version(
                n.opset, n.proto.SerializeToString(), types))
        elif schema.has_function:
            fn = schema.get_function_with_opset_version(n.opset) or schema.function_body
            if isinstance(fn, bytes):
                fn = onnx.FunctionProto.FromString(fn)
        else:
            return None
    except Exception:
        return None
    inputs = [onnx.helper.make_tensor_value_info(name, _ELEM.get(t, TensorProto.FLOAT), None)
              for name, t in zip(fn.input, n.in_types) if t]
    bound = {f: a for f, a in zip(fn.input, n.proto.input) if a}
    nodes = [x for x in fn.node if all(i in bound or not i or i not in fn.input for i in x.input)]
    graph = onnx.helper.make_graph(nodes, "body", inputs, [onnx.helper.make_empty_tensor_value_info(o) for o in fn.output])
    model = onnx.helper.make_model(graph, opset_imports=list(fn.opset_import) or [onnx.helper.make_opsetid("", n.opset)])
    try:
        return _nodes(model)
    except Exception:
        return None


def _ort_kernel(table: dict, node: _Node, bound: dict | None = None) -> str | None:
    """None when a kernel of `table` serves `node` (with its types, or `bound` instead), else why not."""
    bound = node.bound if bound is None else bound
    kernels = table["ops"].get(f"{node.domain}:{node.op}")
    if not kernels:
        return f"no {table['provider']} kernel for {node.op}"
    since = node.since
    versioned = [k for k in kernels if since is None or k["range"][0] == since
                 or (k["range"][0] < since and k["range"][1] is not None and k["range"][1] >= since)]
    if not versioned:
        have = ", ".join(f"{k['range'][0]}" + (f"-{k['range'][1]}" if k["range"][1] else "+") for k in kernels)
        return f"no {table['provider']} kernel for {node.op}-{since} (kernels registered for opsets {have})"
    for k in versioned:
        if all(t in k["constraints"][p] for p, ts in bound.items() if p in k["constraints"] for t in ts if t != "?"):
            return None
    want = ", ".join(f"{p}={'/'.join(sorted(set(ts)))}" for p, ts in bound.items())
    return f"no {table['provider']} kernel for {node.op}-{since} with {want}"


def _cpu_upcast(cpu: dict, n: _Node) -> bool:
    """ONNX Runtime's InsertCastTransformer runs a float16 node that has no CPU float16 kernel in
    float32 between inserted Casts (float16 only: bfloat16 nodes get no such help)."""
    if not any("float16" in ts for ts in n.bound.values()):
        return False
    as_float = {p: ["float" if t == "float16" else t for t in ts] for p, ts in n.bound.items()}
    return _ort_kernel(cpu, n, as_float) is None


_RANK = {"upcast": 0, "inlined": 1, "fallback": 2, "fail": 3}


def _check_ort(graph: str, nodes: list[_Node], target: str, depth: int = 0) -> list[Finding]:
    table, cpu = load_table(target), load_table("cpu")
    found = []
    for n in nodes:
        if n.op == "Constant" and n.domain == "ai.onnx":  # ONNX Runtime turns Constants into initializers
            continue
        why = _ort_kernel(table, n)
        if why is None:
            continue
        if target == "cpu" and _cpu_upcast(cpu, n):
            found.append(Finding(graph, n.name, n.op, "upcast", why + ": runs in float32 between inserted Casts"))
        elif target == "cuda" and (_ort_kernel(cpu, n) is None or _cpu_upcast(cpu, n)):
            found.append(Finding(graph, n.name, n.op, "fallback", why + ": runs on the CPU provider"))
        elif n.function and depth < 3 and (body := _body(n)) is not None:
            inner = [f for f in _check_ort(graph, body, target, depth + 1) if f.severity in ("fail", "fallback")]
            if inner:  # ONNX Runtime expands the body; a body node without a kernel decides
                worst = max(inner, key=lambda f: _RANK[f.severity])
                found.append(Finding(graph, n.name, n.op, worst.severity,
                                     f"{why}; its inlined function body needs {worst.op}: {worst.reason}"))
            else:
                found.append(Finding(graph, n.name, n.op, "inlined", why + ": ONNX Runtime inlines its function body"))
        else:
            found.append(Finding(graph, n.name, n.op, "fail", why + ": the session fails to load"))
    return found


def _check_trt(graph: str, nodes: list[_Node], io: set[str], opset: int) -> list[Finding]:
    table = load_table("trt")
    lo, hi = table["opset"]
    found = []
    if not lo <= opset <= hi:
        found.append(Finding(graph, "-", "-", "fail", f"ai.onnx opset {opset} outside TensorRT {table['tensorrt']}'s {lo}..{hi}"))
    for n in nodes:
        row = table["ops"].get(f"{n.domain}:{n.op}")
        if row is None or not row["supported"]:
            why = "not in the parser's operator table" if row is None else "listed as unsupported"
            found.append(Finding(graph, n.name, n.op, "fail", f"{n.op} ({n.domain}) {why} (TensorRT {table['tensorrt']})"))
            continue
        why = _trt_restriction(n)
        if why:
            found.append(Finding(graph, n.name, n.op, "fail", f"{why} (TensorRT {table['tensorrt']} restriction)"))
        bad = sorted({t for t in n.bound.get(n.data_param, []) if t not in row["types"] and t != "?"})
        if bad:
            found.append(Finding(graph, n.name, n.op, "fail",
                                 f"{n.op} in {'/'.join(bad)}: the parser takes {', '.join(row['types'])}"))
        if table.get("uint8_io_only"):
            inner = [name for name, t in n.tensors if t == "uint8" and name not in io]
            if inner:
                found.append(Finding(graph, n.name, n.op, "fail",
                                     f"UINT8 tensor {inner[0]!r} inside the network (TensorRT allows UINT8 only as a network input or output)"))
    return found


def _trt_restriction(n: _Node) -> str | None:
    """The operators.md restrictions of the ops these graphs use that can be read off the node."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.proto.attribute}
    if n.op == "Attention":
        if len([x for x in n.proto.input if x]) > 4 or len([x for x in n.proto.output if x]) > 1:
            return "Attention with past_key/past_value/nonpad_kv_seqlen inputs or present/qk outputs"
        if attrs.get("softcap", 0.0) or attrs.get("qk_matmul_output_mode", 0):
            return "Attention with softcap or qk_matmul_output_mode"
    if n.op == "TensorScatter" and attrs.get("axis", -2) != -2:
        return f"TensorScatter on axis {attrs['axis']} (must be -2)"
    return None


def check_graph(path: Path, target: str, graph: str | None = None) -> list[Finding]:
    """Findings for every node of the ONNX graph at `path` on `target` (cpu, cuda or trt)."""
    load_table(target)
    model = onnx.load(str(path), load_external_data=False)
    nodes = _nodes(model)
    name = graph or Path(path).stem
    if target == "trt":
        io = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        return _check_trt(name, nodes, io, opset)
    return _check_ort(name, nodes, target)


def check_directory(directory: Path, manifest, target: str) -> dict[str, list[Finding]]:
    """graph name -> findings, for every graph of an engine directory."""
    return {g: check_graph(Path(directory) / spec.file, target, g) for g, spec in manifest.graphs.items()}
