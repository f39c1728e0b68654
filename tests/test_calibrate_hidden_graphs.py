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


def test_int8_quantizes_the_tree_graph_with_the_steps_scales(demo_tree_engine, calib_set, tmp_path):
    """The quantized step_tree has Q/DQ nodes, its logits equal the quantized step's on held-out feeds (max abs
    <= 1e-4, measured 0), and its hidden states stay close to fp32 (cosine >= 0.99, relative L2 <= 0.15 per
    position); the head built into an engine comes along unchanged."""
    from arexport.calibration.calibrate import calibrate_engine
    from arexport.format.manifest import read_manifest, verify_files

    out = tmp_path / "q"
    new = calibrate_engine(demo_tree_engine, out, "int8", samples=16, calib_set=calib_set, every=8)
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
