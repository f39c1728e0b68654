"""The `ort` backend: ONNX Runtime sessions driven through IOBinding on torch buffers.

Each cache buffer is bound as both `past_*` input and `present_*` output, so TensorScatter writes
the new K/V in place and nothing copies the cache per step (ORT logs a warning whenever it has to
copy; tests assert it never does). On the CUDA execution provider (onnxruntime-gpu) the same
binding runs on device memory, and `cuda_graph=True` captures one CUDA graph per (step kind,
batch) with `gpu_graph_id` — buffers and shapes stay fixed per graph, as CUDA graphs require.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from arexport.errors import ArexportError, BackendUnavailable
from arexport.runtime.backends.dir_arrays import EngineDirArrays
from arexport.runtime.engine import Conditions, StepEngine, graph_feeds
from arexport.runtime.loading import DTYPES
from arexport.spec import ModelSpec

ONNX_TYPES = {torch.float32: 1, torch.uint8: 2, torch.int64: 7, torch.bool: 9, torch.float16: 10, torch.bfloat16: 16}


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - a core dependency
        raise BackendUnavailable(f"onnxruntime is not installed ({e})") from None
    return ort


class OrtEngine(EngineDirArrays, StepEngine):
    """StepEngine over an engine directory's ONNX graphs."""

    backend = "ort"

    def __init__(self, directory: Path, manifest: dict[str, Any], spec: ModelSpec, device="cpu",
                 threads: Optional[int] = None, cuda_graph: bool = False, optimization: str = "all"):
        ort = _ort()
        precision = manifest["precision"]
        super().__init__(spec, torch.device(device), DTYPES[precision])
        if precision == "bf16" and self.device.type == "cpu":
            raise BackendUnavailable("ONNX Runtime's CPU provider has no bf16 MatMul kernels: build fp32/fp16 for CPU, "
                                     "or run this bf16 engine on CUDA/TensorRT")
        self.directory = Path(directory)
        self.manifest = manifest
        self.max_q = int(manifest["graphs"]["step"]["q_range"][1])
        self.cuda_graph = cuda_graph
        self._providers = self._make_providers(ort, cuda_graph)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[optimization]
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 2  # warnings and above: in-place fallbacks are visible
        self._sess_options = opts
        g = manifest["graphs"]
        self.step_sess = self._session(g["step"]["file"])
        self.prefill_sess = self._session(g["prefill"]["file"]) if "prefill" in g else None
        self.vq_sess = self._session(g["vq_decoder"]["file"], device_graph=False) if "vq_decoder" in g else None
        self._graph_ids: dict[tuple, int] = {}

    # -- sessions -----------------------------------------------------------------------------
    def _make_providers(self, ort, cuda_graph: bool):
        if self.device.type == "cpu":
            if cuda_graph:
                raise ArexportError("--cuda-graph needs a CUDA device")
            return ["CPUExecutionProvider"]
        if self.device.type != "cuda":
            raise ArexportError(f"ONNX Runtime backend supports cpu and cuda devices, not {self.device}")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable(
                "ONNX Runtime has no CUDA execution provider here: install onnxruntime-gpu (pip install arexport[gpu])"
            )
        cuda_opts = {"device_id": str(self.device.index or 0)}
        if cuda_graph:
            cuda_opts["enable_cuda_graph"] = "1"
        return [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]

    def _session(self, file: str, device_graph: bool = True):
        ort = _ort()
        providers = self._providers
        if not device_graph and self.cuda_graph:  # the image decoder runs once per batch: no graph
            providers = [(p[0], {k: v for k, v in p[1].items() if k != "enable_cuda_graph"}) if isinstance(p, tuple) else p for p in providers]
        try:
            return ort.InferenceSession(str(self.directory / file), self._sess_options, providers=providers)
        except Exception as e:  # ORT raises Fail/InvalidGraph/InvalidProtobuf on corrupt files
            raise ArexportError(f"ONNX Runtime cannot load {self.directory / file}: {str(e).splitlines()[0][:300]}") from None

    # -- binding helpers ---------------------------------------------------------------------------
    def _bind_in(self, io, name: str, t: torch.Tensor) -> None:
        io.bind_input(name, t.device.type, t.device.index or 0, ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())

    def _bind_out(self, io, name: str, t: torch.Tensor) -> None:
        io.bind_output(name, t.device.type, t.device.index or 0, ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())

    def _bind_cache(self, io, cache) -> None:
        for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
            self._bind_in(io, f"past_key_{i}", k)
            self._bind_out(io, f"present_key_{i}", k)  # same buffer: in-place TensorScatter
            self._bind_in(io, f"past_value_{i}", v)
            self._bind_out(io, f"present_value_{i}", v)

    def _run(self, sess, io, key: tuple) -> None:
        ort = _ort()
        ro = ort.RunOptions()
        if self.cuda_graph:
            gid = self._graph_ids.setdefault(key, len(self._graph_ids) + 1)
            ro.add_run_config_entry("gpu_graph_id", str(gid))
        sess.run_with_iobinding(io, ro)

    # -- StepEngine ---------------------------------------------------------------------------------
    def _step(self, cache, tokens, positions, write_index, attn_mask):
        feeds = graph_feeds(self.device, tokens=tokens, positions=positions, write_index=write_index, attn_mask=attn_mask)
        return self._run_step(cache, feeds, ("step",) + tuple(tokens.shape))

    def _multi_query_step(self, cache, tokens, positions, write_index, attn_mask, query_positions, query_mask):
        feeds = graph_feeds(self.device, tokens=tokens, positions=positions, write_index=write_index, attn_mask=attn_mask,
                            query_positions=query_positions, query_mask=query_mask)
        return self._run_step(cache, feeds, ("multi_query",) + tuple(tokens.shape) + (query_positions.shape[1],))

    def _run_step(self, cache, feeds: dict, key: tuple) -> torch.Tensor:
        """Bind feeds, the cache (in place) and a fresh logits buffer [B, queries, V]; run the step graph."""
        out_rows = feeds["query_positions" if "query_positions" in feeds else "tokens"].shape
        logits = torch.empty(*out_rows, self.spec.vocab_size, dtype=torch.float32, device=self.device)
        io = self.step_sess.io_binding()
        for name, t in feeds.items():
            self._bind_in(io, name, t)
        self._bind_cache(io, cache)
        self._bind_out(io, "logits", logits)
        self._run(self.step_sess, io, key)
        return logits

    def _prefill_embeds(self, cache, conds: Conditions, attn_mask):
        if self.prefill_sess is None:
            raise ArexportError(f"{self.directory} has no prefill graph")
        b = len(conds)
        emb = conds.embeds.to(self.device, self.cache_dtype).contiguous()
        mask = attn_mask.to(self.device, torch.bool).contiguous()
        logits = torch.empty(b, self.spec.vocab_size, dtype=torch.float32, device=self.device)
        io = self.prefill_sess.io_binding()
        self._bind_in(io, "cond_embeds", emb)
        self._bind_in(io, "attn_mask", mask)
        self._bind_cache(io, cache)
        self._bind_out(io, "logits", logits)
        self._run(self.prefill_sess, io, ("prefill", b))
        return logits

    @property
    def has_images(self) -> bool:
        return self.vq_sess is not None

    def _decode_images(self, tokens):
        if self.vq_sess is None:
            raise ArexportError(f"{self.directory} was built without an image decoder (no VQ weights given at build time)")
        out = self.vq_sess.run(["images"], {"tokens": tokens.cpu().numpy().astype(np.int64)})[0]
        return torch.from_numpy(out)
