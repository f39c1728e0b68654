"""Export step functions to ONNX (opset 24) with static KV-cache inputs and aliased outputs.

The dynamo exporter traces a wrapper (graphs.py); the KV write becomes `TensorScatter` and SDPA
with a boolean mask becomes `Attention`. After export every initializer is moved into one shared,
de-duplicated `weights.bin` (4 KiB-aligned, content-addressed), so graphs that share weights
(t2i prefill and step) store them once, and models over 2 GB need no special path.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import onnx
import torch

from arexport.exporter.graphs import DeclaredStepGraph, ImageDecoderGraph, LatentDecoderGraph, NextScaleGraph
from arexport.exporter.ops import OPSET, TRANSLATIONS
from arexport.format.spec import ModelSpec

ALIGN = 4096
WEIGHTS_FILE = "weights.bin"


class WeightStore:
    """Append-only, content-addressed external-data file shared by several ONNX graphs."""

    def __init__(self, directory: Path, filename: str = WEIGHTS_FILE):
        self.path = Path(directory) / filename
        self.filename = filename
        self._index: dict[str, tuple[int, int]] = {}
        self._f = open(self.path, "ab")
        self.unique_bytes = 0
        self.referenced_bytes = 0

    def add(self, data: bytes) -> tuple[int, int]:
        """Store bytes once; returns (offset, length)."""
        key = hashlib.sha256(data).hexdigest()
        self.referenced_bytes += len(data)
        if key in self._index:
            return self._index[key]
        pos = self._f.tell()
        pad = (-pos) % ALIGN
        if pad:
            self._f.write(b"\0" * pad)
            pos += pad
        self._f.write(data)
        self._index[key] = (pos, len(data))
        self.unique_bytes += len(data)
        return pos, len(data)

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


@dataclass
class ExportedGraph:
    """One exported graph file and its I/O names."""

    name: str
    file: str
    inputs: list[str]
    outputs: list[str]
    islands: list[dict] = field(default_factory=list)  # fp32 islands placed in a half graph (exporter/islands.py)
    ops: dict[str, int] = field(default_factory=dict)  # op type -> nodes in the final graph


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints and warnings (we report our own progress)."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _export(module, args, path: Path, input_names, output_names, dynamic_shapes) -> None:
    with _quiet(), torch.no_grad():
        prog = torch.onnx.export(
            module,
            tuple(args),
            dynamo=True,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=TRANSLATIONS,
            optimize=True,
            verbose=False,
            report=False,
        )
        prog.save(str(path), external_data=True)


def pack_graph(raw_path: Path, final_path: Path, store: WeightStore, dim_names: dict[str, str] | None = None,
               rewrite: Optional[Callable[[onnx.ModelProto], list]] = None) -> tuple[list, dict[str, int]]:
    """Move raw_path's initializers (inline or external) into the shared store and write the small
    graph to final_path; symbolic dims are renamed by dim_names, and `rewrite` (a graph pass) edits
    the graph first. Returns what rewrite returned and the final graph's op counts."""
    from arexport.exporter.islands import count_ops

    dim_names = dim_names or {}
    model = onnx.load(str(raw_path), load_external_data=False)
    done = rewrite(model) if rewrite is not None else []
    base = raw_path.parent
    handles: dict[str, object] = {}
    try:
        for init in model.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in init.external_data}
                loc = base / info["location"]
                f = handles.get(str(loc)) or open(loc, "rb")
                handles[str(loc)] = f
                f.seek(int(info.get("offset", 0)))
                data = f.read(int(info["length"])) if "length" in info else f.read()
            elif init.raw_data:
                data = init.raw_data
            else:
                continue  # typed-field constants (tiny) stay inline
            if len(data) < 1024:
                if init.data_location == onnx.TensorProto.EXTERNAL:
                    init.ClearField("external_data")
                    init.data_location = onnx.TensorProto.DEFAULT
                    init.raw_data = data
                continue
            offset, length = store.add(data)
            init.ClearField("raw_data")
            init.ClearField("external_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", store.filename), ("offset", str(offset)), ("length", str(length))):
                e = init.external_data.add()
                e.key, e.value = k, v
    finally:
        for f in handles.values():
            f.close()
    for vi in list(model.graph.input) + list(model.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in dim_names:
                d.dim_param = dim_names[d.dim_param]
    onnx.save(model, str(final_path))
    return done, count_ops(model)


def _dim_renames(path: Path, wanted: dict[tuple[str, int], str]) -> dict[str, str]:
    """Map the exporter's symbolic dim names (s0, s1, ...) to ours, by (input name, axis)."""
    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for vi in model.graph.input:
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_param") and (vi.name, axis) in wanted:
                out[d.dim_param] = wanted[(vi.name, axis)]
    return out


def _cache_args(spec: ModelSpec, batch: int, dtype) -> list[torch.Tensor]:
    shape = spec.cache_shape(batch)
    return [torch.zeros(shape, dtype=dtype) for _ in range(2 * spec.n_cache_layers)]


def graph_file(kind) -> str:
    """File of a step kind's graph: model.onnx for the main step graph, <graph>.onnx otherwise."""
    return "model.onnx" if kind.graph == "step" else f"{kind.graph}.onnx"


def _example(io, sizes: dict[str, int], dtype: torch.dtype) -> torch.Tensor:
    """A tracing input for a declared input (values only need to be valid indices)."""
    shape = tuple(sizes[d] if d in sizes else int(d) for d in io.dims)
    t_dtype = {"int64": torch.int64, "bool": torch.bool, "float32": torch.float32}.get(io.dtype, dtype)
    if io.example == "ones":
        return torch.ones(shape, dtype=t_dtype)
    if io.example == "arange":
        return torch.arange(shape[-1], dtype=t_dtype).expand(shape).contiguous()
    if io.example == "slots":
        return torch.arange(1, shape[0] + 1, dtype=t_dtype)
    return torch.zeros(shape, dtype=t_dtype)


def export_step_kind(model, kind, spec: ModelSpec, workdir: Path, store: WeightStore, dtype: torch.dtype, max_q: int,
                     max_batch: int, live: bool = False) -> ExportedGraph:
    """Export a declared step kind (format.stepkinds): dynamic batch, q (and m) in [1, max_q], with `live` the
    masks' live bound L in [1, S] (else L = S: masks as wide as the cache, no Slice), static everything else; the per-layer caches follow its inputs and outputs."""
    from torch.export import Dim

    from arexport.format.stepkinds import DYNAMIC, MASKED, spec_size

    if max_q < kind.min_max_q:
        raise ValueError(f"the {kind.name} step needs max_q >= {kind.min_max_q} to trace distinct dynamic dims")
    # example sizes: distinct per dynamic dim and >= 2 (torch.export specializes dims traced at 1)
    # live: the masks' bound L traces below S, so the live-slot Slice keeps a symbolic end (models.fused.live_slots)
    sizes = {"batch": 2, "q": min(3, max_q), "m": min(4, max_q), MASKED: spec.s_max - 1 if live else spec.s_max}
    dims = {"batch": Dim("batch", min=1, max=max(max_batch, 2)),
            "q": Dim("q", min=1, max=max_q) if max_q > 1 else None, "m": Dim("m", min=1, max=max_q),
            MASKED: Dim(MASKED, min=1, max=spec.s_max) if live else None}
    if dims["q"] is None:
        sizes["q"] = 1
    used = {d for io in kind.inputs for d in io.dims}
    sizes.update({d: spec_size(spec, d) for d in used if d not in DYNAMIC and not d.isdigit()})
    args = [_example(io, sizes, dtype) for io in kind.inputs] + _cache_args(spec, sizes["batch"], dtype)
    dyn = [{axis: dims[d] for axis, d in enumerate(io.dims) if d in DYNAMIC and dims[d] is not None} for io in kind.inputs]
    dyn = [tuple(dyn + [{0: dims["batch"]}] * (2 * spec.n_cache_layers))]  # the wrapper takes (*inputs, *past) as *args
    wanted: dict[tuple[str, int], str] = {}
    for sym in DYNAMIC:
        for io in kind.inputs:
            if sym in io.dims:
                wanted.setdefault((io.name, io.dims.index(sym)), sym)
                break
    ins, outs = DeclaredStepGraph.io_names(kind, spec.n_cache_layers)
    return _export_packed(kind.graph, DeclaredStepGraph(model, kind), args, dyn, ins, outs, wanted, workdir,
                          graph_file(kind), store)


def export_next_scale(vae, scales, cvae: int, si: int, workdir: Path, store: WeightStore, max_batch: int,
                      half: bool = False) -> ExportedGraph:
    """Export a multi-scale VQVAE's next-scale input of scale si (format.scales.Scales; dynamic batch),
    as next_scale_{si}.onnx (fp32 in and out; `half`: the VQVAE's parameters are fp16/bf16)."""
    from torch.export import Dim

    pn, hw = scales.patch_nums[si], scales.patch_nums[-1]
    args = [torch.zeros(2, cvae, hw, hw), torch.zeros(2, pn * pn, cvae)]
    n = Dim("n", min=1, max=max(max_batch, 2))
    ins, outs = NextScaleGraph.io_names(si == len(scales) - 1)
    return _export_decoder(f"next_scale_{si}", NextScaleGraph(vae, si), args, [{0: n}, {0: n}], ins, outs,
                           {("f_hat", 0): "batch"}, workdir, f"next_scale_{si}.onnx", store, half)


def export_latent_decoder(vae, scales, cvae: int, workdir: Path, store: WeightStore, max_batch: int,
                          half: bool = False) -> ExportedGraph:
    """Export a multi-scale VQVAE's decoder f_hat (fp32) -> uint8 images (dynamic number of images)."""
    from torch.export import Dim

    hw = scales.patch_nums[-1]
    n = Dim("n", min=1, max=max(max_batch, 2))
    ins, outs = LatentDecoderGraph.io_names()
    return _export_decoder("latent_decoder", LatentDecoderGraph(vae), [torch.zeros(2, cvae, hw, hw)], [{0: n}], ins, outs,
                           {("f_hat", 0): "batch"}, workdir, "latent_decoder.onnx", store, half)


class _T5Graph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_text_encoder(model, max_length: int, workdir: Path, store: WeightStore, max_batch: int) -> ExportedGraph:
    """Export a T5 encoder: (input_ids, attention_mask) [N, max_length] int64 -> last_hidden_state [N, max_length, C] fp32."""
    from torch.export import Dim

    ids = torch.ones(2, max_length, dtype=torch.int64)
    mask = torch.ones(2, max_length, dtype=torch.int64)
    mask[1, max_length // 2:] = 0
    n = Dim("n", min=1, max=max(max_batch, 2))
    return _export_packed("text_encoder", _T5Graph(model.float().eval()), [ids, mask], [{0: n}, {0: n}],
                          ["input_ids", "attention_mask"], ["last_hidden_state"], {("input_ids", 0): "batch"}, workdir,
                          "text_encoder.onnx", store)


def export_image_decoder(decoder, spec: ModelSpec, workdir: Path, store: WeightStore, max_batch: int,
                         file: str = "vq_decoder.onnx", half: bool = False) -> ExportedGraph:
    """Export tokens -> uint8 images (dynamic number of images; `half`: the decoder's parameters are fp16/bf16)."""
    from torch.export import Dim

    tokens = torch.zeros(2, spec.n_tokens, dtype=torch.int64)
    n = Dim("n", min=1, max=max(max_batch, 2))
    ins, outs = ImageDecoderGraph.io_names()
    return _export_decoder("vq_decoder", ImageDecoderGraph(decoder), [tokens], [{0: n}], ins, outs,
                           {("tokens", 0): "batch"}, workdir, file, store, half)


def _export_packed(name: str, module, args, dynamic_shapes, ins, outs, wanted: dict[tuple[str, int], str],
                   workdir: Path, file: str, store: WeightStore, rewrite=None) -> ExportedGraph:
    """Export `module` to a raw ONNX file, pack it into workdir/file with its weights in `store`
    (dims named by `wanted`: (input, axis) -> name; `rewrite` as pack_graph's), and remove the raw files."""
    raw = workdir / f".raw_{file}"
    try:
        _export(module.eval(), args, raw, ins, outs, dynamic_shapes)
        done, ops = pack_graph(raw, workdir / file, store, _dim_renames(raw, wanted), rewrite)
    finally:
        _cleanup_raw(raw)
    return ExportedGraph(name, file, ins, outs, islands=done, ops=ops)


def _export_decoder(name: str, module, args, dynamic_shapes, ins, outs, wanted, workdir: Path, file: str,
                    store: WeightStore, half: bool) -> ExportedGraph:
    """An image decoder's (or VAR next-scale) graph: GroupNorms as nodes with GPU kernels
    (exporter/groupnorm.py) and, in a half graph, fp32 islands where the CUDA table has no half
    kernel (exporter/islands.py)."""
    from arexport.exporter.groupnorm import export_group_norms
    from arexport.exporter.islands import add_fp32_islands

    with export_group_norms(module):
        return _export_packed(name, module, args, dynamic_shapes, ins, outs, wanted, workdir, file, store,
                              rewrite=add_fp32_islands if half else None)


def _cleanup_raw(raw: Path) -> None:
    for p in raw.parent.glob(raw.name + "*"):
        p.unlink()
