"""An exported EAGLE draft head's TensorRT plan (`arexport build-head ... --backend trt`), run beside a target on the GPU.

`TrtDraftHead` offers what `OrtDraftHead` (runtime/backends/ort/head.py) and the PyTorch head offer the eagle
decoders (`cfg`, `dtype`, `max_q`, `allocate`, `step`): the same head.json record (a head directory's, or the
`draft_head` record of an engine directory's manifest), the same limits and the same errors. The cache buffers
are CUDA tensors of the head's static length; the graph's `present_*` outputs alias its `past_*` inputs
(TensorScatter -> IKVCacheUpdateLayer), so they are bound to the same addresses and the plan writes the cache
in place, as the target's TrtEngine does. One execution context (the `draft` profile: 1..max_batch rows,
1..max_q pairs) on its own stream. Written against the TensorRT 10.15/11 Python API; TensorRT cannot be
installed on this project's CI machines, where its tests skip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from arexport.errors import ArexportError
from arexport.runtime.backends.ort.head import allocate_head_cache, head_limits, read_head_info


class TrtDraftHead:
    """A draft head's TensorRT plan; tensors in and out are torch on `device` (CUDA)."""

    def __init__(self, directory: str, target_dim: int, target_vocab: int, device: str = "cuda"):
        from arexport.devices import current_gpu, require_tensorrt
        from arexport.runtime.backends.trt.loader import Plan, check_plan_compat

        d = Path(directory)
        info = read_head_info(d, "draft head directory")
        rec = info.get("tensorrt")
        if not rec:
            raise ArexportError(f"draft head {d} has no TensorRT plan: rebuild it with `arexport build-head ... --backend trt` "
                                "(or run the target on the CPU, where the head runs on ONNX Runtime)")
        dev = torch.device(device)
        if dev.type != "cuda":
            raise ArexportError(f"a TensorRT draft head runs on a CUDA device, not {device}")
        trt = require_tensorrt()
        index = dev.index or 0
        check_plan_compat(rec, trt.__version__, current_gpu(index))
        self.cfg, self.slots, self.max_q, self.max_batch = head_limits(info, d, target_dim, target_vocab)
        self.dtype = torch.float32  # the head graph is exported in fp32
        self.device = dev
        self.stream = torch.cuda.Stream(dev)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.plan = Plan(trt, runtime, d / rec["plan"], rec["profiles"], self.stream)
        self.calls = 0

    def allocate(self, batch: int, slots: int):
        """Zeroed per-layer K and V buffers [batch, H_kv, self.slots, D] on the GPU; `slots` is what the caller needs."""
        return allocate_head_cache(self, batch, slots, self.device)

    def step(self, hidden, tokens, positions, write_index, attn_mask, keys, values):
        """As EagleHead.step: (logits [B,q,V] fp32, out hidden [B,q,dim], keys, values), K/V written in place."""
        b, q = tokens.shape
        if q > self.max_q:
            raise ArexportError(f"a draft-head call of {q} pairs exceeds the exported head's limit {self.max_q}: rebuild "
                                "it with a larger --verify-len")
        dev = self.device
        feeds = {"hidden": hidden.detach().to(dev, torch.float32).contiguous(), "tokens": tokens.to(dev, torch.int64).contiguous(),
                 "positions": positions.to(dev, torch.int64).contiguous(),
                 "write_index": write_index.to(dev, torch.int64).contiguous(), "attn_mask": attn_mask.to(dev, torch.bool).contiguous()}
        logits = torch.empty(b, q, self.cfg.vocab_size, device=dev)
        out = torch.empty(b, q, self.cfg.dim, device=dev)
        ctx = self.plan.contexts[self.plan.profile_for("draft", b, q)]
        self.stream.wait_stream(torch.cuda.current_stream(dev))
        for name, t in feeds.items():
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        for i, (k, v) in enumerate(zip(keys, values)):
            for io, buf in (("key", k), ("value", v)):
                if not buf.is_contiguous() or buf.device != dev:
                    raise ArexportError("the TensorRT draft head writes its cache in place: pass the buffers its allocate() made")
                ctx.set_input_shape(f"past_{io}_{i}", tuple(buf.shape))
                ctx.set_tensor_address(f"past_{io}_{i}", buf.data_ptr())
                ctx.set_tensor_address(f"present_{io}_{i}", buf.data_ptr())  # aliased output: the same buffer
        ctx.set_tensor_address("logits", logits.data_ptr())
        ctx.set_tensor_address("hidden_out", out.data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise ArexportError(f"TensorRT execution failed for the draft head (batch {b}, q {q})")
        torch.cuda.current_stream(dev).wait_stream(self.stream)
        self.calls += 1
        return logits, out, keys, values


def has_plan(directory: str) -> Optional[dict]:
    """The head record's TensorRT section, or None."""
    return read_head_info(Path(directory), "draft head directory").get("tensorrt")
