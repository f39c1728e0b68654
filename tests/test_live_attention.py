"""Attention over the live slots only (issue 35): masks narrowed to the live bound of each call give the
same outputs as masks as wide as the cache, for every family and step kind (verify's own cases, on the
tiny configs): within verify's fp32 tolerance on the PyTorch reference (SDPA's CPU kernel blocks its
softmax by key length) and bit for bit on an ONNX Runtime engine; the live bound is the last visible
slot; engines built with --live-attention declare it, default builds keep full-width masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from arexport.runtime import engine as engine_mod
from arexport.verify import TOLERANCES

TINY = {"n_layer": 2, "dim": 64, "n_head": 4, "grid_size": 4, "multiple_of": 32}


def _tiny(family: str, tmp_path_factory):
    """(loaded model, step kinds to check) of one family's tiny config."""
    from arexport.models.registry import load_model

    if family == "llamagen-c2i":
        return load_model("llamagen-c2i-B", random_init=True, seed=1, overrides=dict(TINY)), ("token", "token_hidden", "tree_verify")
    if family == "llamagen-t2i":
        return load_model("llamagen-t2i-B", random_init=True, seed=2, overrides=dict(TINY, cls_token_num=6, caption_dim=32)), None
    if family == "arpg":
        return load_model("arpg-L", random_init=True, seed=3, overrides=dict(TINY)), None
    if family == "rar":
        return load_model("rar-b", random_init=True, seed=5, overrides=dict(dim=64, n_layer=2, n_head=4, intermediate_size=96,
                                                                           num_classes=10, vocab_size=40, grid_size=4)), None
    if family == "par":
        return load_model("par-XL-4x", random_init=True, seed=6, overrides=dict(TINY)), None
    if family == "var":
        return load_model("demo-var"), None
    d = tmp_path_factory.mktemp(family)
    if family == "janus":
        from test_janus import make_janus

        make_janus(d / "m")
        return load_model("janus-pro", checkpoint=str(d / "m"), overrides={"prompt_slots": 16}), None
    if family == "emu3":
        from test_emu3 import OVERRIDES, make_emu3

        make_emu3(d / "m")
        return load_model("emu3-gen", checkpoint=str(d / "m"), overrides=OVERRIDES), None
    if family == "lumina":
        from test_lumina_mgpt import OVERRIDES, make_lumina

        make_lumina(d / "m")
        return load_model("lumina-mgpt-7b-768", checkpoint=str(d / "m"), overrides=OVERRIDES), None
    raise AssertionError(family)


@pytest.fixture
def exact_bound(monkeypatch):
    """Live bound rounded to 1 slot (tiny caches are shorter than the real bucket of 32 slots), and a log
    of the mask widths the engine actually fed."""
    widths: list[tuple[int, int]] = []
    narrow = engine_mod.narrow_masks

    def logged(kind, feeds, slots):
        out = narrow(kind, feeds, slots)
        widths.extend((slots, t.shape[-1]) for io, t in ((io, out[io.name]) for io in kind.inputs) if "L" in io.dims)
        return out

    monkeypatch.setattr(engine_mod, "live_bucket", lambda slots: 1)
    monkeypatch.setattr(engine_mod, "narrow_masks", logged)
    return widths


def _both(eng, case):
    from arexport.verify import run_case

    eng.live_masks = False
    full = run_case(eng, case)
    eng.live_masks = True
    return full, run_case(eng, case)


@pytest.mark.parametrize("family", ["llamagen-c2i", "llamagen-t2i", "arpg", "rar", "par", "var", "janus", "emu3", "lumina"])
def test_live_masks_give_the_same_outputs_for_every_step_kind(family, exact_bound, tmp_path_factory):
    from arexport.runtime.backends.torch.runner import TorchEngine
    from arexport.verify import make_cases

    loaded, kinds = _tiny(family, tmp_path_factory)
    eng = TorchEngine(loaded)
    cases = make_cases(eng.spec, batch=2, verify_len=4, seed=1, steps=kinds)
    atol, rtol = TOLERANCES["fp32"]
    for case in cases:
        full, live = _both(eng, case)
        for name in full:
            assert np.allclose(live[name], full[name], atol=atol, rtol=rtol), (family, name, np.abs(full[name] - live[name]).max())
    assert any(w < s for s, w in exact_bound), "no call was narrowed: the test would not exercise live slots"


def test_a_bound_that_hides_a_visible_slot_changes_the_logits(exact_bound, monkeypatch):
    """Negative control: narrowing one slot too far (the last visible slot dropped) is caught."""
    from arexport.models.registry import load_model
    from arexport.runtime.backends.torch.runner import TorchEngine
    from arexport.verify import make_cases

    eng = TorchEngine(load_model("llamagen-c2i-B", random_init=True, seed=1, overrides=dict(TINY)))
    width = engine_mod.live_width
    monkeypatch.setattr(engine_mod, "live_width", lambda masks, slots: width(masks, slots) - 1)
    differ = 0
    for case in make_cases(eng.spec, batch=2, verify_len=4, seed=1):
        full, live = _both(eng, case)
        differ += not np.array_equal(full["logits"], live["logits"])
    assert differ


def test_live_width_is_the_last_visible_slot_rounded_to_the_bucket():
    from arexport.runtime.engine import live_bucket, live_width

    m = torch.zeros(2, 1, 3, 264, dtype=torch.bool)
    m[0, 0, :, :40] = True
    m[1, 0, 2, 70] = True  # a tree / padded mask: only one query sees slot 70
    assert live_width([m], 264) == 96  # slot 70 -> 71 slots -> 3 buckets of 32
    q = torch.zeros(2, 1, 1, 264, dtype=torch.bool)
    q[1, 0, 0, 200] = True  # ARPG: the query mask can reach further than the token mask
    assert live_width([m, q], 264) == 224
    assert live_width([torch.ones(1, 1, 1, 264, dtype=torch.bool)], 264) == 264
    assert live_width([torch.zeros(1, 1, 1, 264, dtype=torch.bool)], 264) == 264  # nothing visible: no narrowing
    assert live_bucket(264) == 32 and live_bucket(8000) == 504  # at most 16 widths per cache


@pytest.fixture(scope="module")
def live_engine(tmp_path_factory):
    """A tiny c2i LlamaGen engine built with --live-attention."""
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.models.registry import load_model

    out = tmp_path_factory.mktemp("engines") / "live"
    build_engine(load_model("llamagen-c2i-B", random_init=True, seed=1, overrides=dict(TINY)), out,
                 BuildOptions(batch_sizes=[1, 2, 4], verify_len=4, images=False, live_attention=True))
    return out


def test_live_engine_declares_the_bound_and_is_bit_identical_on_ort(live_engine, demo_engine, exact_bound, capfd):
    from arexport.format.manifest import read_manifest
    from arexport.runtime.loading import open_engine
    from arexport.verify import make_cases

    m = json.loads((live_engine / "manifest.json").read_text())
    assert {i["name"]: i["shape"] for i in m["graphs"]["step"]["inputs"]}["attn_mask"] == ["batch", 1, "q", "L"]
    assert m["export"]["live_attention"] and engine_mod.graphs_take_live_masks(read_manifest(live_engine))
    # a default build keeps masks as wide as the cache (no Slice), and its runner never narrows them
    assert not engine_mod.graphs_take_live_masks(read_manifest(demo_engine))
    assert not open_engine(str(demo_engine), "ort").live_masks
    eng = open_engine(str(live_engine), "ort")
    assert eng.live_masks
    for case in make_cases(eng.spec, batch=2, verify_len=4, seed=1):
        full, live = _both(eng, case)
        for name in full:
            assert np.array_equal(full[name], live[name]), (name, np.abs(full[name] - live[name]).max())
    assert any(w < s for s, w in exact_bound)
    # the cache is still written in place through the Slice that follows the TensorScatter
    cache = eng.allocate(2)
    ptrs = [t.data_ptr() for t in cache.keys + cache.values]
    eng.family.prefill(eng, cache, eng.family.conditions(eng.spec, classes=[1, 2]))
    w = cache.length.clone()
    eng.step(cache, torch.tensor([[3], [4]]), torch.zeros(2, 1, dtype=torch.long), w, cache.causal_mask(w, 1))
    assert [t.data_ptr() for t in cache.keys + cache.values] == ptrs and cache.keys[0][:, :, 1].abs().sum() > 0
    assert "in-place optimization not activated" not in capfd.readouterr().err
