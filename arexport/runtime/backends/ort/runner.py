"""Runner of the `ort` backend: ONNX Runtime sessions driven through IOBinding on torch buffers.

Each cache buffer is bound as both `past_*` input and `present_*` output, so TensorScatter writes
the new K/V in place and nothing copies the cache per step (ORT logs a warning whenever it has to
copy; tests assert it never does). On the CUDA execution provider (onnxruntime-gpu) the same
binding runs on device memory, and `cuda_graph=True` captures one CUDA graph per (step kind,
batch) with `gpu_graph_id` — buffers and shapes stay fixed per graph, as CUDA graphs require.
"""

from __future__ import annotations

import numpy as np
import torch

from arexport.runtime.backends.arrays import EngineDirArrays
from arexport.runtime.backends.ort.loader import OrtSessions, _ort
from arexport.runtime.engine import StepEngine, graph_feeds

ONNX_TYPES = {torch.float32: 1, torch.uint8: 2, torch.int64: 7, torch.bool: 9, torch.float16: 10, torch.bfloat16: 16}


class OrtEngine(EngineDirArrays, StepEngine):
    """StepEngine over an engine directory's ONNX graphs."""

    backend = "ort"

    def __init__(self, sessions: OrtSessions, manifest, device: torch.device, cache_dtype: torch.dtype):
        super().__init__(manifest.spec, device, cache_dtype, max_q=int(manifest.step.q_range[1]))
        self.sessions = sessions
        self.directory = sessions.directory
        self.manifest = manifest
        self.fixed_slots = manifest.spec.s_max
        self.cuda_graph = sessions.cuda_graph
        self._graph_ids: dict[tuple, int] = {}

    # -- binding helpers ---------------------------------------------------------------------------
    def _bind_in(self, io, name: str, t: torch.Tensor) -> None:
        io.bind_input(name, t.device.type, t.device.index or 0, ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())

    def _bind_out(self, io, name: str, t: torch.Tensor) -> None:
        io.bind_output(name, t.device.type, t.device.index or 0, ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())

    def _run(self, graph: str, feeds: dict[str, torch.Tensor], cache, logits: torch.Tensor, key: tuple) -> torch.Tensor:
        """Bind feeds, the cache (each buffer as both past_* and present_*: in place) and `logits`; run."""
        sess = self.sessions.get(graph)
        io = sess.io_binding()
        for name, t in feeds.items():
            self._bind_in(io, name, t)
        for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
            for kind, buf in (("key", k), ("value", v)):
                self._bind_in(io, f"past_{kind}_{i}", buf)
                self._bind_out(io, f"present_{kind}_{i}", buf)
        self._bind_out(io, "logits", logits)
        ro = _ort().RunOptions()
        if self.cuda_graph:
            gid = self._graph_ids.setdefault(key, len(self._graph_ids) + 1)
            ro.add_run_config_entry("gpu_graph_id", str(gid))
        sess.run_with_iobinding(io, ro)
        return logits

    def _logits(self, *rows: int) -> torch.Tensor:
        return torch.empty(*rows, self.spec.vocab_size, dtype=torch.float32, device=self.device)

    # -- StepEngine ---------------------------------------------------------------------------------
    def _step(self, cache, tokens, positions, write_index, attn_mask):
        feeds = graph_feeds(self.device, tokens=tokens, positions=positions, write_index=write_index, attn_mask=attn_mask)
        return self._run("step", feeds, cache, self._logits(*tokens.shape), ("step",) + tuple(tokens.shape))

    def _multi_query_step(self, cache, tokens, positions, write_index, attn_mask, query_positions, query_mask):
        feeds = graph_feeds(self.device, tokens=tokens, positions=positions, write_index=write_index, attn_mask=attn_mask,
                            query_positions=query_positions, query_mask=query_mask)
        return self._run("step", feeds, cache, self._logits(*query_positions.shape),
                         ("multi_query",) + tuple(tokens.shape) + (query_positions.shape[1],))

    def _prefill_embeds(self, cache, embeds, attn_mask):
        feeds = {"cond_embeds": embeds.to(self.device, self.cache_dtype).contiguous(),
                 "attn_mask": attn_mask.to(self.device, torch.bool).contiguous()}
        return self._run("prefill", feeds, cache, self._logits(embeds.shape[0]), ("prefill", embeds.shape[0]))

    @property
    def has_images(self) -> bool:
        return self.sessions.has("vq_decoder")

    def _decode_images(self, tokens):
        if not self.has_images:
            from arexport.errors import ArexportError

            raise ArexportError(f"{self.directory} was built without an image decoder (no VQ weights given at build time)")
        out = self.sessions.get("vq_decoder").run(["images"], {"tokens": tokens.cpu().numpy().astype(np.int64)})[0]
        return torch.from_numpy(out)
