"""calibrate on an engine with the hidden-state graph EAGLE heads verify with (tree_verify's step_tree): the graph
is quantized on the same captured samples as the step, so it computes the same model ar decodes with, and its
hidden states stay close to the full-precision ones the head was trained on."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def calib_set(demo_tree_engine, tmp_path_factory):
    """A small calibration set of demo_tree_engine (8 images, every 8th step)."""
    from arexport.calibration.capture import capture_set

    out = tmp_path_factory.mktemp("calib") / "set"
    capture_set(demo_tree_engine, out, list(range(8)), every=8, samples=16)
    return out


@pytest.fixture(scope="module")
def quantized_tree(demo_tree_engine, calib_set, tmp_path_factory):
    """demo_tree_engine quantized to int8 on calib_set: (directory, manifest)."""
    from arexport.calibration.calibrate import calibrate_engine

    out = tmp_path_factory.mktemp("qtree") / "q"
    return out, calibrate_engine(demo_tree_engine, out, "int8", samples=16, calib_set=calib_set, every=8)


def test_int8_quantizes_the_tree_graph_with_the_steps_scales(quantized_tree):
    """The quantized step_tree has Q/DQ nodes, its logits equal the quantized step's on held-out feeds (max abs
    <= 1e-4, measured 0), and its hidden states stay close to fp32 (cosine >= 0.99, relative L2 <= 0.15 per
    position); the head built into an engine comes along unchanged."""
    from arexport.format.manifest import read_manifest, verify_files

    out, new = quantized_tree
    verify_files(out, read_manifest(out))
    m = onnx.load(str(out / new.graphs["step_tree"].file), load_external_data=False)
    assert sum(n.op_type == "DequantizeLinear" for n in m.graph.node) > 10
    fid = new.quantization["graphs"]["step_tree"]["fidelity"]
    assert fid["logits_vs_step_max_abs"] <= 1e-4 and fid["samples"] >= 1
    assert fid["hidden_cosine_min"] >= 0.99 and fid["hidden_rel_l2_max"] <= 0.15, fid


def test_a_tree_graph_quantized_with_other_scales_is_refused(demo_tree_engine, calib_set, tmp_path, monkeypatch):
    """Negative control: the tree graph calibrated on other samples (caches scaled by 4, so other MinMax scales)
    computes another model than the quantized step: refused in one line, nothing written."""
    from arexport.calibration import quantize
    from arexport.calibration.calibrate import calibrate_engine
    from arexport.errors import ArexportError

    orig = quantize.quantize_step_graph

    def other_scales(src, dst, mode, samples, activations="s8"):
        if src.name != "model.onnx":
            samples = [{k: v * 4 if k.startswith("past_") else v for k, v in s.items()} for s in samples]
        return orig(src, dst, mode, samples, activations)

    monkeypatch.setattr(quantize, "quantize_step_graph", other_scales)
    with pytest.raises(ArexportError, match="step_tree graph's logits differ from the quantized step graph's"):
        calibrate_engine(demo_tree_engine, tmp_path / "q", "int8", samples=16, calib_set=calib_set, every=8)
    assert not (tmp_path / "q").exists()


def test_verify_checks_the_quantized_tree_graph_too(quantized_tree, monkeypatch):
    """`arexport verify` on a quantized engine runs every step graph the directory has: the tree-verification
    graph's logits count in the top-1/KL gates and its hidden states are compared with the reference's (cosine
    per position, beside calibrate's figure). Negative controls: without the tree graph fewer positions are
    gated and no hidden fidelity is reported; noise on the quantized hidden states shows in the cosine."""
    import torch

    from arexport.runtime.loading import open_engine
    from arexport.verify import verify_quantized

    out, new = quantized_tree
    engine = open_engine(str(out), backend="ort")
    ref = open_engine(str(out), backend="torch", verify_hashes=False)
    assert "tree_verify" in engine.step_kinds()

    def positions(rep):
        return int(rep.gates[0]["name"].split("(")[1].split()[0])

    rep = verify_quantized(engine, ref, new.quantization, verify_len=4, n_images=0, demo_images=0)
    assert rep.passed, rep.gates
    h = rep.hidden_fidelity["tree_verify"]
    # random-token cases sit further from calibration's real decoding states than its held-out samples do
    # (measured: min 0.962, mean 0.993 here, against calibrate's 0.999 on real steps)
    assert h["positions"] > 0 and 0.9 <= h["cosine_min"] <= h["cosine_mean"] <= 1.0 + 1e-9, h
    assert h["calibrate_cosine_min"] == new.quantization["graphs"]["step_tree"]["fidelity"]["hidden_cosine_min"]

    token_only = tuple(k for k in engine.step_kinds() if k != "tree_verify")
    monkeypatch.setattr(engine, "step_kinds", lambda: token_only)
    fewer = verify_quantized(engine, ref, new.quantization, verify_len=4, n_images=0, demo_images=0)
    assert positions(fewer) < positions(rep) and not fewer.hidden_fidelity
    monkeypatch.undo()

    run = engine.run

    def noisy(kind, *a, **kw):
        outs = run(kind, *a, **kw)
        if "hidden" in outs:
            g = torch.Generator().manual_seed(0)
            outs = dict(outs, hidden=outs["hidden"] + torch.randn(outs["hidden"].shape, generator=g) * outs["hidden"].std())
        return outs

    monkeypatch.setattr(engine, "run", noisy)
    bad = verify_quantized(engine, ref, new.quantization, verify_len=4, n_images=0, demo_images=0)
    assert bad.hidden_fidelity["tree_verify"]["cosine_mean"] < 0.85, bad.hidden_fidelity
