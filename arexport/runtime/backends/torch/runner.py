"""Runner of the `torch` backend: the PyTorch reference model on static cache buffers, eager or CUDA graphs.

With `cuda_graph=True` (CUDA only) each (step kind, batch, q[, m], cache) is captured once into a
CUDA graph over static input buffers and replayed with the same addresses; the K/V scatter into the
cache is part of the graph. Capture runs the step (warm-up) with the real inputs, which writes the
same K/V the replay writes, so the first call costs extra time but nothing else.
"""

from __future__ import annotations

import torch

from arexport.errors import ArexportError
from arexport.runtime.engine import StepEngine


class TorchEngine(StepEngine):
    """StepEngine over a LlamaGen module; K/V are scattered into the cache buffers in place."""

    backend = "torch"

    def __init__(self, loaded, device="cpu", cuda_graph: bool = False):
        """loaded: an arexport.models.LoadedModel (the loader builds it)."""
        model = loaded.model
        dtype = next(model.parameters()).dtype
        super().__init__(loaded.spec, torch.device(device), dtype)
        self.loaded = loaded
        self.model = model.to_precision(self.device, dtype).eval()
        self.decoder = loaded.decoder.to(self.device).eval() if loaded.decoder is not None else None
        if cuda_graph and self.device.type != "cuda":
            raise ArexportError("--cuda-graph needs a CUDA device")
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple, tuple] = {}
        self._pool = None

    @torch.inference_mode()
    def _step(self, cache, tokens, positions, write_index, attn_mask):
        inputs = [t.to(self.device) for t in (tokens, positions, write_index, attn_mask)]

        def run(tok, pos, w, mask):
            return self.model.step(tok, pos, w, mask, cache.keys, cache.values)[0]

        return self._maybe_graph(("step", cache.keys[0].data_ptr()), run, inputs)

    @torch.inference_mode()
    def _multi_query_step(self, cache, tokens, positions, write_index, attn_mask, query_positions, query_mask):
        inputs = [t.to(self.device) for t in (tokens, positions, write_index, attn_mask, query_positions, query_mask)]

        def run(tok, pos, w, mask, qpos, qmask):
            return self.model.step(tok, pos, w, mask, qpos, qmask, cache.keys, cache.values)[0]

        return self._maybe_graph(("multi_query", cache.keys[0].data_ptr()), run, inputs)

    @torch.inference_mode()
    def _scale_step(self, cache, features, positions, classes, write_index, attn_mask):
        inputs = [features.to(self.device, torch.float32), *(t.to(self.device) for t in (positions, classes, write_index, attn_mask))]

        def run(f, pos, c, w, mask):
            return self.model.step(f, pos, c, w, mask, cache.keys, cache.values)[0]

        return self._maybe_graph(("scale", cache.keys[0].data_ptr()), run, inputs)

    @torch.inference_mode()
    def _next_scale(self, si, f_hat, h):
        self._need_decoder()
        return self.decoder.next_scale(si, f_hat.to(self.device), h.to(self.device))

    @torch.inference_mode()
    def _decode_latents(self, f_hat):
        self._need_decoder()
        return self.decoder.latents_to_images(f_hat.to(self.device))

    def _need_decoder(self):
        if self.decoder is None:
            raise ArexportError(f"no image decoder for {self.spec.name}: pass --vq-checkpoint (or --random-init for random VQ weights)")

    def _maybe_graph(self, key: tuple, run, inputs: list):
        """Eager call, or replay of a CUDA graph captured once per (key, input shapes)."""
        if not self.cuda_graph:
            return run(*inputs)
        key = key + tuple(tuple(t.shape) for t in inputs)
        entry = self._graphs.get(key)
        if entry is None:
            static = [t.clone() for t in inputs]
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                run(*static)  # warm-up: same inputs, same cache writes as the replay
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = run(*static)
            entry = self._graphs[key] = (graph, static, out)
        graph, static, out = entry
        for dst, src in zip(static, inputs):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return out.clone()

    @torch.inference_mode()
    def _prefill_embeds(self, cache, embeds, attn_mask):
        embeds = embeds.to(self.device, dtype=self.cache_dtype)
        logits, _, _ = self.model.prefill_embeds(embeds, attn_mask, cache.keys, cache.values)
        return logits

    @property
    def has_images(self) -> bool:
        return self.decoder is not None

    @torch.inference_mode()
    def _decode_images(self, tokens):
        self._need_decoder()
        return self.decoder(tokens)

    def codebook(self) -> torch.Tensor:
        if self.decoder is None:
            raise ArexportError(f"no codebook for {self.spec.name}: pass --vq-checkpoint")
        return self.decoder.codebook().detach().float().to(self.device)

    def null_caption(self) -> torch.Tensor:
        return self.model.cls_embedding.uncond_embedding.detach()
