"""Runner of the `ort` backend: ONNX Runtime sessions driven through IOBinding on torch buffers.

Each cache buffer is bound as both `past_*` input and `present_*` output, so TensorScatter writes
the new K/V in place and nothing copies the cache per step (ORT logs a warning whenever it has to
copy; tests assert it never does).

Static I/O (the CUDA-graph discipline, on every device): each (graph, step shape, cache buffers)
launch owns fixed input buffers and a fixed logits buffer (`_StaticIO`), bound once together with
the cache; a call copies its feeds into those buffers, runs, and returns a copy of the logits. With
`cuda_graph=True` (CUDA EP, `enable_cuda_graph`) each launch also has its own `gpu_graph_id`: ORT
captures the first run of an id and afterwards only replays it, ignoring new feeds and new binding
addresses, so anything but fixed buffers would read the first step's inputs and return an unwritten
tensor. The CPU path runs the very same code, so the CPU tests exercise it.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from arexport.runtime.backends.arrays import EngineDirArrays
from arexport.runtime.backends.ort.loader import OrtSessions, _ort
from arexport.runtime.engine import TORCH_DTYPES, StepEngine, graphs_take_live_masks

ONNX_TYPES = {torch.float32: 1, torch.uint8: 2, torch.int64: 7, torch.bool: 9, torch.float16: 10, torch.bfloat16: 16}


class _Binding:
    """One IOBinding of a session, bound through ORT's C binding with devices made once (the
    Python wrapper makes an OrtDevice per bound name, which costs more than a small model's step).
    `bound` records name -> (address, shape) of every binding made, `binds` how many were made."""

    def __init__(self, session):
        C = _ort().capi._pybind_state
        self._sess = session._sess
        self._io = C.SessionIOBinding(self._sess)
        self._devices: dict[tuple, object] = {}
        self.bound: dict[str, tuple[int, tuple]] = {}
        self.binds = 0

    def _device(self, t: torch.Tensor):
        key = (t.device.type, t.device.index or 0)
        dev = self._devices.get(key)
        if dev is None:
            from onnxruntime.capi.onnxruntime_inference_collection import OrtDevice

            dev = self._devices[key] = OrtDevice.make(*key)._get_c_device()
        return dev

    def _note(self, name: str, t: torch.Tensor) -> None:
        self.bound[name] = (t.data_ptr(), tuple(t.shape))
        self.binds += 1

    def input(self, name: str, t: torch.Tensor) -> None:
        self._io.bind_input(name, self._device(t), ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())
        self._note(name, t)

    def output(self, name: str, t: torch.Tensor) -> None:
        self._io.bind_output(name, self._device(t), ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())
        self._note("out:" + name, t)

    def run(self, run_options) -> None:
        self._sess.run_with_iobinding(self._io, run_options)


class _StaticIO:
    """Fixed buffers of one launch (graph, step shape, cache buffers), bound once.

    inputs: name -> tensor shaped like the feeds of the first call; outputs: the step kind's declared
    outputs (logits float32 [rows.., V], and e.g. hidden states), each a fixed buffer; the cache's K/V
    buffers bound as past_* and present_* (in place). `run` copies new feeds into the inputs, runs,
    and returns copies of the outputs (the next run overwrites the buffers)."""

    def __init__(self, session, cache, feeds: dict[str, torch.Tensor], outputs: dict[str, tuple], device, run_options):
        self.inputs = {n: torch.empty_like(t) for n, t in feeds.items()}
        self.outputs = {n: torch.empty(*shape, dtype=dtype, device=device) for n, (shape, dtype) in outputs.items()}
        self.binding = _Binding(session)
        for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
            for kind, buf in (("key", k), ("value", v)):
                self.binding.input(f"past_{kind}_{i}", buf)
                self.binding.output(f"present_{kind}_{i}", buf)
        for n, t in self.inputs.items():
            self.binding.input(n, t)
        for n, t in self.outputs.items():
            self.binding.output(n, t)
        self.run_options = run_options

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for n, t in feeds.items():
            self.inputs[n].copy_(t, non_blocking=True)
        self.binding.run(self.run_options)
        return {n: t.clone() for n, t in self.outputs.items()}


def _launch_key(graph: str, feeds: dict[str, torch.Tensor], cache) -> tuple:
    """What fixes a launch's buffers: the graph, each feed's name/shape/dtype, and the cache's
    buffer addresses and row shape (a cache at other addresses needs its own binding and graph)."""
    return (graph, tuple((n, tuple(t.shape), t.dtype) for n, t in feeds.items()), cache.buffer_key())


class OrtEngine(EngineDirArrays, StepEngine):
    """StepEngine over an engine directory's ONNX graphs."""

    backend = "ort"
    MAX_STATIC = 32  # launches whose static buffers are kept (least recently used dropped first)

    def __init__(self, sessions: OrtSessions, manifest, device: torch.device, cache_dtype: torch.dtype):
        super().__init__(manifest.spec, device, cache_dtype, max_q=manifest.max_q)
        self.sessions = sessions
        self.directory = sessions.directory
        self.manifest = manifest
        self.fixed_slots = manifest.spec.s_max
        self.live_masks = graphs_take_live_masks(manifest)
        self.cuda_graph = sessions.cuda_graph
        self.static: "OrderedDict[tuple, _StaticIO]" = OrderedDict()
        self._graph_count = 0  # gpu_graph_ids handed out; never reused (ORT keeps a captured id forever)
        self._run_options = _ort().RunOptions()
        self._kinds = tuple(k.name for k in manifest.step_graphs().values())
        self._output_specs: dict[tuple, dict[str, tuple]] = {}  # (kind, feed shapes) -> output (shape, dtype)

    def _static_io(self, graph: str, feeds: dict[str, torch.Tensor], cache, outputs: dict[str, tuple]) -> _StaticIO:
        key = _launch_key(graph, feeds, cache)
        entry = self.static.get(key)
        if entry is not None:  # most recently used last
            self.static.move_to_end(key)
            return entry
        ro = self._run_options
        if self.cuda_graph:
            self._graph_count += 1
            ro = _ort().RunOptions()
            ro.add_run_config_entry("gpu_graph_id", str(self._graph_count))
        entry = _StaticIO(self.sessions.get(graph), cache, feeds, outputs, self.device, ro)
        self.static[key] = entry
        while len(self.static) > self.MAX_STATIC:
            self.static.popitem(last=False)
        return entry

    def _run(self, graph: str, feeds: dict[str, torch.Tensor], cache, outputs: dict[str, tuple]) -> dict[str, torch.Tensor]:
        """Copy `feeds` into the launch's static inputs and run; the outputs (name -> (shape, dtype)).

        On CUDA the copies, the run (ORT's `user_compute_stream`) and the copies of the outputs are
        ordered on the sessions' stream, which waits for the caller's stream first."""
        stream = self.sessions.stream
        if stream is None:
            return self._static_io(graph, feeds, cache, outputs).run(feeds)
        current = torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            outs = self._static_io(graph, feeds, cache, outputs).run(feeds)
        current.wait_stream(stream)
        for t in outs.values():
            t.record_stream(current)
        return outs

    # -- StepEngine ---------------------------------------------------------------------------------
    def step_kinds(self) -> tuple[str, ...]:
        return self._kinds

    def _forward(self, kind, cache, feeds):
        # `run` has bound and checked these feeds' dims already; the output shapes follow from the feed
        # shapes alone, so they are worked out once per (kind, shapes) instead of at every step
        key = (kind.name, *(t.shape for t in feeds.values()))
        outs = self._output_specs.get(key)
        if outs is None:
            dims = kind.bind(feeds)
            outs = {io.name: (kind.output_shape(io, dims, self.spec), TORCH_DTYPES.get(io.dtype, self.cache_dtype))
                    for io in kind.outputs}
            if len(self._output_specs) >= 4096:  # bounded: (kind, batch, q) combinations
                self._output_specs.clear()
            self._output_specs[key] = outs
        return self._run(kind.graph, feeds, cache, outs)

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
