"""Runner of the `trt` backend: TensorRT plans run with `execute_async_v3` on torch CUDA buffers.

Cache outputs are bound to the address of the input they alias (`present_key_i` -> the buffer of
`past_key_i`), so IKVCacheUpdateLayer writes in place. One execution context per optimization
profile (step kind); with `cuda_graph=True` each (profile, shapes, cache) launch is captured once
and replayed with fixed addresses. Written against the TensorRT 10.15/11 Python API; TensorRT is
not installable on this project's CI machines, where the tests of this module skip.
"""

from __future__ import annotations

from pathlib import Path

import torch

from arexport.errors import ArexportError
from arexport.runtime.backends.arrays import EngineDirArrays
from arexport.runtime.backends.trt.loader import Plan
from arexport.runtime.engine import TORCH_DTYPES, StepEngine, graphs_take_live_masks


class TrtEngine(EngineDirArrays, StepEngine):
    """StepEngine over an engine directory's TensorRT plans."""

    backend = "trt"

    def __init__(self, directory: Path, manifest, device: torch.device, cache_dtype: torch.dtype, plans: dict[str, Plan],
                 stream, cuda_graph: bool = False):
        super().__init__(manifest.spec, device, cache_dtype, max_q=manifest.max_q)
        self.directory = directory
        self.manifest = manifest
        self.fixed_slots = manifest.spec.s_max
        self.live_masks = graphs_take_live_masks(manifest)
        self.stream = stream
        self.plans = plans
        self.max_batch = max(manifest.profiles.batch_sizes)
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple, tuple] = {}
        self._kinds = tuple(k.name for k in manifest.step_graphs().values())

    def _bind(self, ctx, feeds: dict, outputs: dict, cache) -> None:
        for name, t in feeds.items():
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        if cache is not None:
            for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
                for nm, buf in ((f"past_key_{i}", k), (f"past_value_{i}", v)):
                    ctx.set_input_shape(nm, tuple(buf.shape))
                    ctx.set_tensor_address(nm, buf.data_ptr())
                # aliased outputs must be bound to their input's address (IKVCacheUpdateLayer)
                ctx.set_tensor_address(f"present_key_{i}", k.data_ptr())
                ctx.set_tensor_address(f"present_value_{i}", v.data_ptr())
        for name, t in outputs.items():
            ctx.set_tensor_address(name, t.data_ptr())

    def _launch(self, plan: Plan, kind, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
                cache, q: int) -> None:
        """Run one plan call (`kind`: the profile labels it may use); with cuda_graph, capture once per
        (profile, shapes, cache) and replay."""
        b = next(iter(feeds.values())).shape[0]
        idx = plan.profile_for(kind, b, q)
        ctx = plan.contexts[idx]
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.cuda_graph:
            self._bind(ctx, feeds, outputs, cache)
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise ArexportError(f"TensorRT execution failed for {kind} (batch {b}, q {q})")
        else:
            key = (kind, idx, tuple(tuple(t.shape) for t in feeds.values()),
                   cache.keys[0].data_ptr() if cache is not None else 0)
            entry = self._graphs.get(key)
            if entry is None:
                static_in = {n: t.clone() for n, t in feeds.items()}
                static_out = {n: torch.empty_like(t) for n, t in outputs.items()}
                self._bind(ctx, static_in, static_out, cache)
                with torch.cuda.stream(self.stream):
                    ctx.execute_async_v3(self.stream.cuda_stream)  # warm-up outside capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    ctx.execute_async_v3(self.stream.cuda_stream)
                entry = self._graphs[key] = (graph, static_in, static_out)
            graph, static_in, static_out = entry
            with torch.cuda.stream(self.stream):
                for n, t in feeds.items():
                    static_in[n].copy_(t, non_blocking=True)
                graph.replay()
                for n, t in outputs.items():
                    t.copy_(static_out[n], non_blocking=True)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def step_kinds(self) -> tuple[str, ...]:
        return self._kinds

    def _forward(self, kind, cache, feeds):
        dims = kind.bind(feeds)
        outs = {io.name: torch.empty(kind.output_shape(io, dims, self.spec), device=self.device,
                                     dtype=TORCH_DTYPES.get(io.dtype, self.cache_dtype)) for io in kind.outputs}
        self._launch(self.plans[kind.graph], kind.labels, feeds, outs, cache, dims.get("q", 0))
        return outs

    def _next_scale(self, si, f_hat, h):
        name = f"next_scale_{si}"
        if name not in self.plans:
            raise ArexportError(f"{self.directory} has no {name} plan")
        f_hat = f_hat.to(self.device, torch.float32).contiguous()
        outs = {"f_hat_out": torch.empty_like(f_hat)}
        for o in self.manifest.graphs[name].outputs:  # `next` [batch, pn'^2, Cvae], except after the last scale
            if o["name"] == "next":
                outs["next"] = torch.empty(f_hat.shape[0], *o["shape"][1:], dtype=torch.float32, device=self.device)
        self._launch(self.plans[name], name, {"f_hat": f_hat, "h": h.to(self.device, torch.float32).contiguous()}, outs, None, 0)
        return outs["f_hat_out"], outs.get("next")

    def _decode_latents(self, f_hat):
        if "latent_decoder" not in self.plans:
            raise ArexportError(f"{self.directory} has no latent decoder plan")
        s = self.spec.image.image_size
        out = torch.empty(f_hat.shape[0], s, s, 3, dtype=torch.uint8, device=self.device)
        self._launch(self.plans["latent_decoder"], "latent_decoder", {"f_hat": f_hat.to(self.device, torch.float32).contiguous()},
                     {"images": out}, None, 0)
        return out

    @property
    def has_images(self) -> bool:
        return "vq_decoder" in self.plans

    def _decode_images(self, tokens):
        if "vq_decoder" not in self.plans:
            raise ArexportError(f"{self.directory} has no image decoder plan")
        n = tokens.shape[0]
        s = self.spec.image.image_size
        out = torch.empty(n, s, s, 3, dtype=torch.uint8, device=self.device)
        self._launch(self.plans["vq_decoder"], "vq_decoder", {"tokens": tokens.contiguous()}, {"images": out}, None, 0)
        return out
