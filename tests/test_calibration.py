"""Capture -> quantize -> gate -> run on ORT CPU, and a broken quantization failing its gate."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from arexport.calibration.calibrate import calibrate_engine
from arexport.calibration.quantize import head_matmul
from arexport.exporter.build import BuildOptions, build_engine
from arexport.format.manifest import read_manifest
from arexport.errors import ArexportError
from arexport.models.registry import load_model
from arexport.runtime.generator import Generator


@pytest.fixture(scope="module")
def demo_dir(demo_int8):
    """The session's demo engine (conftest): its int8 calibration, and the calibration set it captured
    (demo.calib beside it), are shared with test_newcomer.py instead of built and captured twice."""
    return demo_int8[0]


@pytest.mark.parametrize("mode", ["int8", "fp8", "int4-weight"])
def test_capture_quantize_run_end_to_end(demo_dir, demo_int8, mode):
    out = demo_dir.parent / f"demo-{mode}"
    if mode == "int8":  # the session's int8 calibration (conftest.demo_int8) is this mode's run
        assert demo_int8[1] == out
        m = demo_int8[3]
    else:
        m = calibrate_engine(demo_dir, out, mode, samples=40)
    q = m.quantization
    assert q["mode"] == mode and q["qdq_nodes"] > 0 and len(q["calibration"]["hash"]) == 64
    g = q["gates"]
    assert g["passed"] and 0.0 <= g["top1_agreement"] <= 1.0 and g["mean_kl"] >= 0.0 and g["heldout_steps"] > 0
    assert g["demo"]["quantized"]["accuracy"] >= g["demo"]["reference"]["accuracy"] - g["thresholds"]["max_accuracy_drop"]
    assert read_manifest(out).quantization["gates"] == g
    hist = m.report["step"]["op_histogram"]
    assert "DequantizeLinear" in hist and hist["TensorScatter"] == 8  # the cache writes survive quantization
    head = head_matmul(demo_dir / "model.onnx")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}
    head_node = [n for n in graph.node if n.name in head][0]
    w = head_node.input[1]
    assert w not in producers or producers[w].op_type != "DequantizeLinear"  # the output head stays in fp32
    gen = Generator.load(str(out), backend="ort")
    res = gen.generate(classes=[1, 2, 3], method="sjd", images=True)
    assert res.images.shape == (3, 128, 128, 3)
    if mode != "fp8":  # fp8 weights take as many bytes as int8 here; int8/int4 must shrink the file
        assert m.weights["unique_bytes"] < 0.5 * read_manifest(demo_dir).weights["unique_bytes"]


def test_calibration_set_is_reused_and_validated(demo_dir, tmp_path):
    calib = demo_dir.parent / "demo.calib"
    assert (calib / "manifest.json").exists()  # captured by the session's int8 calibration (conftest.demo_int8)
    stamp = os.path.getmtime(calib / "manifest.json")
    m = calibrate_engine(demo_dir, tmp_path / "b", "int8", samples=40)
    assert os.path.getmtime(calib / "manifest.json") == stamp
    assert m.quantization["calibration"]["hash"] == json.loads((calib / "manifest.json").read_text())["hash"]
    used = json.loads((calib / "manifest.json").read_text())["classes"]
    calibrate_engine(demo_dir, tmp_path / "same", "int8", samples=40, classes=used)  # the same classes: reused
    with pytest.raises(ArexportError, match=r"was captured from classes .* not the --classes given"):
        calibrate_engine(demo_dir, tmp_path / "d", "int8", samples=40, classes=[7, 7, 7, 7])
    assert not (tmp_path / "d").exists()
    import shutil

    copy = tmp_path / "copy.calib"
    shutil.copytree(calib, copy)
    np.savez(sorted(copy.glob("sample_*.npz"))[0], tokens=np.zeros((1, 1), np.int64))
    with pytest.raises(ArexportError, match="is missing or modified"):
        calibrate_engine(demo_dir, tmp_path / "c", "int8", samples=40, calib_set=copy)
    assert not (tmp_path / "c").exists()


def test_broken_quantization_fails_the_gate(demo_dir, tmp_path, monkeypatch):
    import arexport.calibration.quantize as qmod

    real = qmod.quantize_step_graph

    def absurd_scales(src, dst, mode, samples, activations="s8"):
        info = real(src, dst, mode, samples, activations)
        model = onnx.load(str(dst))
        for init in model.graph.initializer:
            if "scale" in init.name and init.data_type == onnx.TensorProto.FLOAT:
                arr = onnx.numpy_helper.to_array(init) * 1000.0
                init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
        onnx.save_model(model, str(dst), save_as_external_data=True, location=dst.name + ".data2")
        return info

    monkeypatch.setattr(qmod, "quantize_step_graph", absurd_scales)
    with pytest.raises(ArexportError, match="failed its accuracy gate .*nothing was written"):
        calibrate_engine(demo_dir, tmp_path / "broken", "int8", samples=40)
    assert not (tmp_path / "broken").exists()
    m = calibrate_engine(demo_dir, tmp_path / "forced", "int8", samples=40, force=True)
    assert m.quantization["forced"] and not m.quantization["gates"]["passed"]
    assert m.quantization["gates"]["top1_agreement"] < 0.9


def test_requantizing_is_refused(demo_int8, tmp_path):
    out = demo_int8[1]  # a quantized engine (int8; any mode is refused the same way, before any work)
    with pytest.raises(ArexportError, match="already quantized"):
        calibrate_engine(out, tmp_path / "qq", "int8")
    assert not (tmp_path / "qq").exists()


def test_capture_holds_the_engines_own_activations_for_a_changed_random_weight_model(tmp_path):
    """A random-weight model changed after loading (weights x8, as the parallel-family tests build theirs)
    records only its seed in the manifest. Every captured cache must be the one the engine's own step graph
    wrote: running the graph on sample i gives sample i+1's K/V (every=1, consecutive decode calls). A capture
    that rebuilt the model from the seed (the bug: other weights) wrote other K/V and fails here."""
    import onnxruntime as ort
    import torch

    from arexport.calibration.capture import capture_set

    lm = load_model("llamagen-c2i-B", random_init=True, seed=4,
                    overrides={"n_layer": 2, "dim": 64, "n_head": 4, "grid_size": 4, "multiple_of": 32, "vocab_size": 64})
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    eng = tmp_path / "eng"
    build_engine(lm, eng, BuildOptions(batch_sizes=[2, 4], verify_len=2, images=False))
    assert read_manifest(eng).source.get("random_init_seed") == 4  # all the manifest knows of these weights
    capture_set(eng, tmp_path / "calib", [0, 1], every=1, samples=64)
    files = sorted((tmp_path / "calib").glob("sample_*.npz"))
    samples = [dict(np.load(f)) for f in files]
    assert len(samples) >= 8
    sess = ort.InferenceSession(str(eng / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    outs = [o.name for o in sess.get_outputs()]
    checked = 0
    for a, b in zip(samples, samples[1:]):
        if a["tokens"].shape[1] != 1 or b["tokens"].shape[1] != 1:  # decode steps follow each other
            continue
        got = dict(zip(outs, sess.run(None, {n: a[n] for n in names})))
        for k in (n for n in outs if n.startswith("present_")):
            np.testing.assert_allclose(got[k], b[k.replace("present_", "past_")], rtol=1e-4, atol=1e-4, err_msg=k)
        checked += 1
    assert checked >= 8
