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
from arexport.runtime.engine import TORCH_DTYPES, StepEngine

ONNX_TYPES = {torch.float32: 1, torch.uint8: 2, torch.int64: 7, torch.bool: 9, torch.float16: 10, torch.bfloat16: 16}


class _Binding:
    """One IOBinding of a session, bound through ORT's C binding with devices made once (the
    Python wrapper makes an OrtDevice per bound name, which costs more than a small model's step).
    Binding a name again replaces its earlier binding."""

    def __init__(self, session):
        C = _ort().capi._pybind_state
        self._sess = session._sess
        self._io = C.SessionIOBinding(self._sess)
        self._devices: dict[tuple, object] = {}
        self._C = C

    def _device(self, t: torch.Tensor):
        key = (t.device.type, t.device.index or 0)
        dev = self._devices.get(key)
        if dev is None:
            from onnxruntime.capi.onnxruntime_inference_collection import OrtDevice

            dev = self._devices[key] = OrtDevice.make(*key)._get_c_device()
        return dev

    def input(self, name: str, t: torch.Tensor) -> None:
        self._io.bind_input(name, self._device(t), ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())

    def output(self, name: str, t: torch.Tensor) -> None:
        self._io.bind_output(name, self._device(t), ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())

    def run(self, run_options) -> None:
        self._sess.run_with_iobinding(self._io, run_options)


class OrtEngine(EngineDirArrays, StepEngine):
    """StepEngine over an engine directory's ONNX graphs."""

    backend = "ort"
    MAX_BINDINGS = 32  # standing cache bindings kept (one per live-row count and cache in use)

    def __init__(self, sessions: OrtSessions, manifest, device: torch.device, cache_dtype: torch.dtype):
        super().__init__(manifest.spec, device, cache_dtype, max_q=manifest.max_q)
        self.sessions = sessions
        self.directory = sessions.directory
        self.manifest = manifest
        self.fixed_slots = manifest.spec.s_max
        self.cuda_graph = sessions.cuda_graph
        self._graph_ids: dict[tuple, int] = {}
        self._bindings: dict[tuple, tuple] = {}
        self._run_options = _ort().RunOptions()
        self._kinds = tuple(k.name for k in manifest.step_graphs().values())

    # -- binding ---------------------------------------------------------------------------------
    def _binding(self, graph: str, cache) -> "_Binding":
        """The IOBinding of `graph` with `cache`'s buffers bound as both past_* and present_* (in
        place). Kept per (graph, cache view): a decode loop binds its cache once, not at every step,
        and only the step's feeds and logits are bound per call. (KVCache.view returns one object
        per row range; the entry holds it, so its id is not reused while the entry lives.)"""
        key = (graph, id(cache))
        entry = self._bindings.pop(key, None)
        if entry is None or entry[0] is not cache:
            bind = _Binding(self.sessions.get(graph))
            for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
                for kind, buf in (("key", k), ("value", v)):
                    bind.input(f"past_{kind}_{i}", buf)
                    bind.output(f"present_{kind}_{i}", buf)
            entry = (cache, bind)
        self._bindings[key] = entry  # most recently used last
        while len(self._bindings) > self.MAX_BINDINGS:
            self._bindings.pop(next(iter(self._bindings)))
        return entry[1]

    def _run(self, graph: str, feeds: dict[str, torch.Tensor], cache, outputs: dict[str, torch.Tensor], key: tuple) -> dict:
        """Bind feeds and `outputs` next to the cache's standing binding; run."""
        bind = self._binding(graph, cache)
        for name, t in feeds.items():
            bind.input(name, t)
        for name, t in outputs.items():
            bind.output(name, t)
        ro = self._run_options
        if self.cuda_graph:
            gid = self._graph_ids.setdefault(key, len(self._graph_ids) + 1)
            ro = _ort().RunOptions()
            ro.add_run_config_entry("gpu_graph_id", str(gid))
        bind.run(ro)
        return outputs

    # -- StepEngine ---------------------------------------------------------------------------------
    def step_kinds(self) -> tuple[str, ...]:
        return self._kinds

    def _forward(self, kind, cache, feeds):
        dims = kind.bind(feeds)
        outs = {io.name: torch.empty(kind.output_shape(io, dims, self.spec), device=self.device,
                                     dtype=TORCH_DTYPES.get(io.dtype, self.cache_dtype)) for io in kind.outputs}
        return self._run(kind.graph, feeds, cache, outs, (kind.graph,) + tuple(t.shape for t in feeds.values()))

    def _next_scale(self, si, f_hat, h):
        outs = self.sessions.get(f"next_scale_{si}").run(None, {  # f_hat_out, and next except after the last scale
            "f_hat": f_hat.detach().cpu().float().numpy(), "h": h.detach().cpu().float().numpy()})
        return torch.from_numpy(outs[0]).to(self.device), torch.from_numpy(outs[1]).to(self.device) if len(outs) > 1 else None

    def _decode_latents(self, f_hat):
        out = self.sessions.get("latent_decoder").run(["images"], {"f_hat": f_hat.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out)

    @property
    def has_images(self) -> bool:
        return self.sessions.has("vq_decoder")

    def _decode_images(self, tokens):
        if not self.has_images:
            from arexport.errors import ArexportError

            raise ArexportError(f"{self.directory} was built without an image decoder (no VQ weights given at build time)")
        out = self.sessions.get("vq_decoder").run(["images"], {"tokens": tokens.cpu().numpy().astype(np.int64)})[0]
        return torch.from_numpy(out)
