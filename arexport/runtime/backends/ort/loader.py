"""Loader of the `ort` backend: session options and providers from an engine directory, sessions on demand."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from arexport.errors import ArexportError, BackendUnavailable


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as e:  # [cpu] or [gpu] not installed
        raise BackendUnavailable(f"onnxruntime is not installed ({e}): pip install 'arexport[cpu]', or 'arexport[gpu]' "
                                 "for the CUDA provider (one of the two, never both)") from None
    return ort


def cuda_graph_graphs() -> frozenset:
    """Graphs the runner drives through IOBinding on static buffers (runner._StaticIO): the graph of
    every declared step kind (format.stepkinds; the runner runs each kind through `_forward`), so a
    kind declared later (a hidden-state or tree step, ...) is captured too. Only these may get CUDA
    graphs: the others (VAR's next_scale_*, latent_decoder, vq_decoder, text_encoder) are fed numpy
    through `session.run`, which ORT's CUDA-graph replay does not support."""
    from arexport.format.stepkinds import STEP_KINDS

    return frozenset(k.graph for k in STEP_KINDS.values())


def providers_for(graph: str, providers: list) -> list:
    """The session providers of `graph`: the directory's, without `enable_cuda_graph` unless the
    graph is run on static IOBinding buffers (cuda_graph_graphs)."""
    if graph in cuda_graph_graphs():
        return list(providers)
    return [(p[0], {k: v for k, v in p[1].items() if k != "enable_cuda_graph"}) if isinstance(p, tuple) else p
            for p in providers]


class OrtSessions:
    """The directory's ONNX Runtime sessions, each created at its first use. On CUDA, `stream` is a
    torch stream that every session computes on (ORT's `user_compute_stream`), so copies into the
    runner's static buffers and the runs are ordered on one stream; None on the CPU."""

    def __init__(self, directory: Path, manifest, device: torch.device, threads: Optional[int], cuda_graph: bool,
                 spin: bool = False):
        ort = _ort()
        self.directory, self.manifest, self.device, self.cuda_graph = directory, manifest, device, cuda_graph
        if manifest.precision == "bf16" and device.type == "cpu":
            raise BackendUnavailable("ONNX Runtime's CPU provider has no bf16 MatMul kernels: build fp32/fp16 for CPU, "
                                     "or run this bf16 engine on CUDA/TensorRT")
        self.stream = None
        self.providers = self._providers(ort, cuda_graph)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        if device.type == "cpu" and not spin:
            # ORT's intra-op workers spin after each parallel section waiting for more; between engine calls
            # that spinning holds the cores the runtime's own step work (sampling, acceptance, masks) runs on.
            # Measured on the demo at batch 1 (2 cores): host CPU per step 0.62 -> 0.32 ms (ar), 1.50 -> 0.70 (sjd),
            # engine CPU 0.58 -> 0.32 ms (docs/benchmarks.md, host work per step). spin=True restores ORT's default.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.log_severity_level = 2  # warnings and above: in-place fallbacks are visible
        self.options = opts
        self._sessions: dict[str, object] = {}

    def _providers(self, ort, cuda_graph: bool):
        if self.device.type == "cpu":
            if cuda_graph:
                raise ArexportError("--cuda-graph needs a CUDA device")
            return ["CPUExecutionProvider"]
        if self.device.type != "cuda":
            raise ArexportError(f"ONNX Runtime backend supports cpu and cuda devices, not {self.device}")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable(
                f"ONNX Runtime {ort.__version__} has no CUDA execution provider here: pip uninstall -y onnxruntime, "
                "then pip install 'arexport[gpu]' (onnxruntime-gpu >= 1.27 with its CUDA 13 libraries)")
        self.stream = torch.cuda.Stream(self.device)
        cuda_opts = {"device_id": str(self.device.index or 0), "user_compute_stream": str(self.stream.cuda_stream)}
        if cuda_graph:
            cuda_opts["enable_cuda_graph"] = "1"
        return [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]

    def has(self, graph: str) -> bool:
        return graph in self.manifest.graphs

    def get(self, graph: str):
        """The session of a graph of the directory (created now if needed)."""
        if graph not in self._sessions:
            if not self.has(graph):
                raise ArexportError(f"{self.directory} has no {graph} graph")
            providers = providers_for(graph, self.providers)
            path = self.directory / self.manifest.graphs[graph].file
            try:
                self._sessions[graph] = _ort().InferenceSession(str(path), self.options, providers=providers)
            except Exception as e:  # ORT raises Fail/InvalidGraph/InvalidProtobuf on corrupt files
                raise ArexportError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:300]}") from None
        return self._sessions[graph]
