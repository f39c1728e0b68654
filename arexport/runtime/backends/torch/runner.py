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
    """StepEngine over a PyTorch model; each step kind runs the model method its declaration names, with
    K/V scattered into the cache buffers in place."""

    backend = "torch"
    # Masks as wide as the cache by default: the reference keeps its bits (SDPA's CPU kernel blocks its
    # softmax by key length, so narrowed masks move logits by ~1e-6); engines narrow them (issue 35).
    live_masks = False

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

    def step_kinds(self) -> tuple[str, ...]:
        return tuple(self.model.step_kinds)

    @torch.inference_mode()
    def _forward(self, kind, cache, feeds):
        """model.<kind.method>(*feeds, keys, values) -> (*outputs, keys, values), K/V scattered in place."""
        method = getattr(self.model, kind.method)

        def run(*inputs):
            return method(*inputs, cache.keys, cache.values)[:len(kind.outputs)]

        outs = self._maybe_graph((kind.name, cache.keys[0].data_ptr()), run, list(feeds.values()))
        return dict(zip(kind.output_names, outs))

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
        return tuple(o.clone() for o in out)

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
