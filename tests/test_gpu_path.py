"""The GPU path, checked on the CPU (issue 29): the ORT runner's static I/O discipline that CUDA
graphs need, which sessions may get CUDA graphs, version checks, and kernel/parser coverage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arexport.families import Conditions
from arexport.runtime.loading import open_engine


def _reference_steps(engine_dir, cache_np: dict[str, np.ndarray], steps):
    """The non-static path: plain `session.run` on numpy feeds, the cache carried by hand from each
    step's present_* outputs. Returns the logits of each step and the final cache."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(engine_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    out_logits = []
    for feeds in steps:
        outs = dict(zip(names, sess.run(names, {**{k: v.numpy() for k, v in feeds.items()}, **cache_np})))
        out_logits.append(outs["logits"])
        cache_np = {k: outs[k.replace("past_", "present_")] for k in cache_np}
    return out_logits, cache_np


def test_ort_static_buffers_are_bound_once_and_equal_the_plain_path(demo_engine):
    """Every launch (step kind x batch x cache) binds its buffers once: across many steps the bound
    addresses never change, the binding is never redone, a second launch of the same shape reuses
    the entry, and each step's logits (kept across later steps) and the cache written in place equal
    plain session.run on numpy feeds."""
    eng = open_engine(str(demo_engine), "ort")
    cache = eng.allocate(2)
    eng.family.prefill(eng, cache, Conditions(classes=torch.tensor([1, 2])))
    cache_np = {f"past_{kind}_{i}": buf.numpy().copy()
                for i, (k, v) in enumerate(zip(cache.keys, cache.values)) for kind, buf in (("key", k), ("value", v))}
    seen: dict[tuple, dict] = {}
    steps, logits = [], []
    g = torch.Generator().manual_seed(7)
    for q in (1, 1, 3, 1, 2, 1, 3, 1):
        tok = torch.randint(0, eng.spec.vocab_size, (2, q), generator=g)
        w = cache.length.clone()
        feeds = dict(tokens=tok, positions=(w - 1)[:, None] + torch.arange(q), write_index=w, attn_mask=cache.causal_mask(w, q))
        steps.append({k: v.clone() for k, v in feeds.items()})
        logits.append(eng.step(cache, **feeds))
        cache.length += q
        for key, entry in eng.static.items():
            now = (dict(entry.binding.bound), entry.binding.binds,
                   {n: t.data_ptr() for n, t in entry.inputs.items()}, entry.logits.data_ptr())
            assert seen.setdefault(key, now) == now, "a static launch was rebound or its buffers moved"
            bound = entry.binding.bound
            assert all(bound[n][0] == t.data_ptr() for n, t in entry.inputs.items())
            assert bound["out:logits"][0] == entry.logits.data_ptr()
            assert bound["past_key_0"][0] == cache.keys[0].data_ptr() == bound["out:present_key_0"][0]
    assert len(eng.static) == 3  # decode, verify q=3, verify q=2: one entry each, however many steps
    ref_logits, ref_cache = _reference_steps(demo_engine, cache_np, steps)
    for got, want in zip(logits, ref_logits):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
        np.testing.assert_allclose(k.numpy(), ref_cache[f"past_key_{i}"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v.numpy(), ref_cache[f"past_value_{i}"], rtol=1e-5, atol=1e-5)


def test_ort_static_buffers_follow_the_cache_addresses(demo_engine):
    """A second cache of the same shape is a different launch (its buffers are bound, and under CUDA
    graphs captured, separately): the key holds the cache's addresses, not the Python object."""
    eng = open_engine(str(demo_engine), "ort")
    a, b = eng.allocate(1), eng.allocate(1)
    for cache in (a, b):
        eng.family.prefill(eng, cache, Conditions(classes=torch.tensor([3])))
        w = cache.length.clone()
        eng.step(cache, torch.tensor([[5]]), (w - 1)[:, None], w, cache.causal_mask(w, 1))
    assert len(eng.static) == 2
    assert torch.equal(a.keys[0], b.keys[0]) and a.keys[0].data_ptr() != b.keys[0].data_ptr()


def test_only_iobinding_graphs_get_cuda_graphs():
    """ORT's CUDA-graph replay needs IOBinding on fixed buffers: the numpy-fed sessions (VAR's
    next_scale_*, latent_decoder, vq_decoder, text_encoder) must never get enable_cuda_graph."""
    from arexport.runtime.backends.ort.loader import CUDA_GRAPH_GRAPHS, providers_for

    base = [("CUDAExecutionProvider", {"device_id": "0", "enable_cuda_graph": "1"}), "CPUExecutionProvider"]
    assert providers_for("step", base)[0][1]["enable_cuda_graph"] == "1"
    assert providers_for("prefill", base)[0][1]["enable_cuda_graph"] == "1"
    for graph in ("next_scale_0", "next_scale_9", "latent_decoder", "vq_decoder", "text_encoder"):
        got = providers_for(graph, base)
        assert "enable_cuda_graph" not in got[0][1] and got[0][1]["device_id"] == "0" and got[1] == "CPUExecutionProvider"
    assert CUDA_GRAPH_GRAPHS == {"step", "prefill"}
    assert base[0][1]["enable_cuda_graph"] == "1"  # the directory's providers are not modified
