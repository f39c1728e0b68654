"""Exported engines match PyTorch, update the cache in place, and refuse bad directories."""

from __future__ import annotations

import collections

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from arexport.exporter.build import BuildOptions, build_engine
from arexport.runtime.backends import open_directory
from arexport.runtime.loading import open_engine
from arexport.format.manifest import read_manifest
from arexport.verify import greedy_agreement, verify_engine
from arexport.errors import ArexportError, ManifestError
from arexport.exporter.checks import check_graph
from arexport.models.registry import load_model
from arexport.families import Conditions

B_SHAPED = {"n_layer": 2}  # LlamaGen-B widths (768 dim, 12 heads, 16x16 grid, vocab 16384), fewer layers


@pytest.fixture(scope="session")
def b_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "b2"
    lm = load_model("llamagen-c2i-B", random_init=True, seed=3, overrides=dict(B_SHAPED))
    build_engine(lm, out, BuildOptions(batch_sizes=[2, 4], verify_len=16, images=False))
    return out


@pytest.fixture(scope="session")
def tiny_images_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny"
    lm = load_model("llamagen-c2i-B", random_init=True, seed=4, overrides={"n_layer": 2, "dim": 64, "n_head": 4, "grid_size": 4, "multiple_of": 32})
    build_engine(lm, out, BuildOptions(batch_sizes=[1, 2], verify_len=4))
    return out


def _verify(path, batch=3):
    eng = open_engine(str(path), "ort")
    ref = open_directory("torch", eng.directory, eng.manifest)
    rep = verify_engine(eng, ref, "fp32", batch=batch, verify_len=eng.manifest.profiles.verify_len, full_image=False)
    return eng, ref, rep


@pytest.mark.parametrize("which", ["demo_engine", "b_engine"])
def test_fp32_step_functions_match_pytorch(which, request):
    eng, ref, rep = _verify(request.getfixturevalue(which))
    cases = {r["case"].split()[0] for r in rep.rows}
    assert cases == {"prefill", "decode", "verify"}
    offsets = {tuple(r["offsets"]) for r in rep.rows}
    assert any(len(set(o)) > 1 for o in offsets), "rows at different cache lengths must be covered"
    assert any(min(o) > eng.spec.cond_len for o in offsets), "non-zero write offsets must be covered"
    logits = [r for r in rep.rows if r["output"] == "logits"]
    worst = max(r["max_abs"] for r in logits)
    assert worst < 1e-4, worst
    assert rep.passed, [r for r in rep.rows if not r["passed"]]


@pytest.mark.parametrize("which,n", [("demo_engine", 4), ("b_engine", 1)])
def test_greedy_whole_images_identical_on_ort_and_torch(which, n, request):
    eng = open_engine(str(request.getfixturevalue(which)), "ort")
    ref = open_directory("torch", eng.directory, eng.manifest)
    agree, same = greedy_agreement(eng, ref, n_images=n, seed=5)
    assert agree == 1.0 and same == f"{n}/{n}"


def test_cache_is_updated_in_place_without_copies(demo_engine, capfd):
    eng = open_engine(str(demo_engine), "ort")
    cache = eng.allocate(2)
    ptrs = [t.data_ptr() for t in cache.keys + cache.values]
    eng.family.prefill(eng, cache, Conditions(classes=torch.tensor([1, 2])))
    before = cache.keys[0][:, :, 1:4].clone()
    w = cache.length.clone()
    eng.step(cache, torch.tensor([[3, 4, 5], [6, 7, 8]]), torch.arange(3).expand(2, 3), w, cache.causal_mask(w, 3))
    assert [t.data_ptr() for t in cache.keys + cache.values] == ptrs
    assert not torch.equal(before, cache.keys[0][:, :, 1:4]), "the step must write K into the bound buffer"
    err = capfd.readouterr().err
    assert "in-place optimization not activated" not in err
    # Negative control: without IOBinding ORT copies the cache and says so — the check above can fail.
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 1
    sess = ort.InferenceSession(str(demo_engine / "model.onnx"), so, providers=["CPUExecutionProvider"])
    feeds = {"tokens": np.zeros((2, 1), np.int64), "positions": np.zeros((2, 1), np.int64),
             "write_index": np.ones(2, np.int64), "attn_mask": np.ones((2, 1, 1, eng.spec.s_max), bool)}
    for name in [i.name for i in sess.get_inputs()][4:]:
        feeds[name] = np.zeros(eng.spec.cache_shape(2), np.float32)
    sess.run(["logits"], feeds)
    assert "in-place optimization not activated" in capfd.readouterr().err


def test_standing_binding_per_cache_view_gives_the_same_logits(demo_engine):
    """The ORT runner binds a cache view's buffers once and rebinds only feeds and logits per step:
    steps through the standing binding, through a second cache and through a fresh engine (which
    binds everything anew) give the same logits and write their own buffers only."""
    eng = open_engine(str(demo_engine), "ort")
    fresh = open_engine(str(demo_engine), "ort")
    a, b, c = eng.allocate(2), eng.allocate(2), fresh.allocate(2)
    conds = Conditions(classes=torch.tensor([1, 2]))
    for e, cache in ((eng, a), (eng, b), (fresh, c)):
        e.family.prefill(e, cache.view(0, 2), conds)
        cache.length.fill_(1)
    assert a.view(0, 2) is a.view(0, 2)  # one view object per row range: what the binding is kept on
    for q in (1, 3, 1, 2):
        tok = torch.randint(0, eng.spec.vocab_size, (2, q), generator=torch.Generator().manual_seed(q))
        outs = []
        for e, cache in ((eng, a), (eng, b), (fresh, c)):
            view = cache.view(0, 2)
            w = view.length.clone()
            outs.append(e.step(view, tok, (w - 1)[:, None] + torch.arange(q), w, view.causal_mask(w, q)).clone())
            view.length += q
        assert torch.equal(outs[0], outs[1]) and torch.allclose(outs[0], outs[2], atol=1e-6)
    assert torch.equal(a.keys[0], b.keys[0]) and a.keys[0].data_ptr() != b.keys[0].data_ptr()


def test_ort_on_cpu_runs_the_runtime_on_one_torch_thread(demo_engine, monkeypatch):
    """Generator.load on an ORT CPU engine sets torch's intra-op threads to 1 (its pool spinning next
    to ORT's made SJD 3x slower), unless host_threads says otherwise; the torch backend is left alone."""
    from arexport.runtime.generator import Generator

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    Generator.load(str(demo_engine), backend="ort")
    Generator.load(str(demo_engine), backend="ort", host_threads=2)
    Generator.load("demo")
    assert seen == [1]


def test_ort_threads_reach_the_draft_engine_too(demo_engine):
    """Generator.load(threads=N) sets the intra-op threads of the draft engine's sessions as well as the target's
    (the CLI's --threads is per engine call, and a draft engine left at ORT's default made sd's draft steps slower
    than the target's on the demo); without it both keep ORT's default (0 = one per core)."""
    from arexport.runtime.generator import Generator

    gen = Generator.load(str(demo_engine), backend="ort", draft=str(demo_engine), threads=1)
    assert gen.engine.sessions.options.intra_op_num_threads == 1
    assert gen.draft.sessions.options.intra_op_num_threads == 1
    plain = Generator.load(str(demo_engine), backend="ort", draft=str(demo_engine))
    assert plain.draft.sessions.options.intra_op_num_threads == 0


def test_fused_rotary_and_norm_nodes_match_the_decomposed_graph(demo_engine, tmp_path):
    """ONNX Runtime engines trace RoPE and RMSNorm as one RotaryEmbedding / RMSNormalization node each
    (issue 19: fewer nodes per decode step); the decomposed graph (fused_ops=False) gives the
    same logits, and eager PyTorch never takes the fused path."""
    import onnx

    plain = tmp_path / "plain"
    build_engine(load_model("demo"), plain, BuildOptions(batch_sizes=[1, 2, 4], verify_len=8, fused_ops=False))
    ops = lambda d: collections.Counter(n.op_type for n in onnx.load(str(d / "model.onnx"), load_external_data=False).graph.node)
    fused_ops, plain_ops = ops(demo_engine), ops(plain)
    spec = load_model("demo").spec
    assert fused_ops["RotaryEmbedding"] == 2 * spec.n_layer and fused_ops["RMSNormalization"] == 2 * spec.n_layer + 1
    assert plain_ops["RotaryEmbedding"] == plain_ops["RMSNormalization"] == 0
    assert sum(fused_ops.values()) < 0.7 * sum(plain_ops.values())
    # per layer: a reshape and a transpose to heads for each of q, k and v, one of each back after
    # attention (plus the rotary tables' two reshapes): none around the rotary nodes; fp32 norms take
    # their weight as the op's scale, so the only Muls left are SwiGLU's two
    assert fused_ops["Reshape"] + fused_ops["Transpose"] == 8 * spec.n_layer + 2
    assert fused_ops["Mul"] == 2 * spec.n_layer
    a, b = open_engine(str(demo_engine), "ort"), open_engine(str(plain), "ort")
    outs = []
    for eng in (a, b):
        cache = eng.allocate(2, lookahead=3)
        eng.family.prefill(eng, cache, Conditions(classes=torch.tensor([3, 9])))
        cache.length.fill_(1)
        w = cache.length.clone()
        tok = torch.tensor([[1, 5, 7, 2], [0, 16, 3, 3]])
        outs.append(eng.step(cache, tok, torch.arange(4).expand(2, 4), w, cache.causal_mask(w, 4)).clone())
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    # TensorRT >= 10.15 imports both ops (onnx-tensorrt docs/operators.md): TensorRT builds fuse too (issue 29)
    assert BuildOptions(backend="trt").validate().fused and not BuildOptions(backend="trt", fused_ops=False).fused


def test_fused_ops_run_eagerly_give_the_plain_forward():
    """The fused custom ops' eager bodies (their semantics for a trace) are the plain arithmetic: a
    teacher-forced forward inside `fused_export()` gives the plain forward's logits."""
    from arexport.models.fused import fused_export

    model = load_model("demo").model.eval()
    cond, tokens = torch.tensor([3, 9]), torch.tensor([[3, 1, 5, 7, 2, 2], [9, 0, 16, 3, 4, 1]])
    with torch.no_grad():
        plain = model(cond, tokens)
        with fused_export():
            fused = model(cond, tokens)
    assert torch.allclose(plain, fused, atol=1e-5, rtol=0) and plain.abs().max() > 0.1


def test_graph_report_and_operators(b_engine):
    m = read_manifest(b_engine)
    hist = m.report["step"]["op_histogram"]
    assert hist["TensorScatter"] == 2 * 2 and hist["Attention"] == 2
    assert not {"If", "Loop", "Scan"} & set(hist)
    step = m.graphs["step"]
    assert step.inputs[0] == {"name": "tokens", "dtype": "int64", "shape": ["batch", "q"]}
    assert step.inputs[3]["shape"] == ["batch", 1, "q", 272]  # 1 + 256 slots + 15 lookahead for q <= 16
    assert step.aliases["present_key_1"] == "past_key_1"
    # Weights are stored once, outside the graph files.
    assert (b_engine / "model.onnx").stat().st_size < 1_000_000
    assert m.weights["unique_bytes"] > 100_000_000


def test_check_graph_flags_control_flow_and_unsupported_ops(tmp_path):
    from onnx import TensorProto, helper

    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["y1"])], "t", [], [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["y2"])], "e", [], [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
             helper.make_node("NonZero", ["x"], ["nz"]), helper.make_node("Hardmax", ["x"], ["h"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1]), helper.make_tensor_value_info("nz", TensorProto.INT64, [1, "n"]),
                           helper.make_tensor_value_info("h", TensorProto.FLOAT, [1])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 24)]), str(path))
    problems = " | ".join(check_graph(path).problems)
    assert "control flow operator If" in problems
    assert "NonZero has a data-dependent output shape" in problems
    assert "Hardmax is not imported by the TensorRT ONNX parser" in problems
    assert "output nz has a dimension 'n' not fixed by the inputs" in problems


def test_fp16_engine_within_tolerance(tmp_path):
    lm = load_model("llamagen-c2i-B", random_init=True, seed=6, overrides={"n_layer": 2, "dim": 128, "n_head": 4, "grid_size": 4, "multiple_of": 64})
    out = tmp_path / "fp16"
    build_engine(lm, out, BuildOptions(precision="fp16", batch_sizes=[2], verify_len=4, images=False))
    eng = open_engine(str(out), "ort")
    assert eng.cache_dtype == torch.float16
    # Reference: the same fp16 weights run by PyTorch in fp32 math (what the fp16 graph approximates).
    ref = open_directory("torch", eng.directory, eng.manifest, precision="fp32")
    rep = verify_engine(eng, ref, "fp16", batch=2, verify_len=4, full_image=False)
    worst = max(r["max_abs"] for r in rep.rows if r["output"] == "logits")
    assert worst < 5e-2 and rep.passed, worst


def test_bf16_graph_exports_and_checks(tmp_path):
    lm = load_model("llamagen-c2i-B", random_init=True, seed=6, overrides={"n_layer": 1, "dim": 64, "n_head": 4, "grid_size": 4, "multiple_of": 32})
    out = tmp_path / "bf16"
    build_engine(lm, out, BuildOptions(precision="bf16", batch_sizes=[2], verify_len=4, images=False))
    m = read_manifest(out)
    assert m.graphs["step"].inputs[4]["dtype"] == "bfloat16"
    assert m.graphs["step"].outputs[0]["dtype"] == "float32"  # logits stay fp32
    with pytest.raises(ArexportError, match="no bf16 MatMul kernels"):
        open_engine(str(out), "ort")


def test_vq_decoder_graph_matches_pytorch(tiny_images_engine):
    eng = open_engine(str(tiny_images_engine), "ort")
    ref = open_directory("torch", eng.directory, eng.manifest)
    tokens = torch.randint(0, 16384, (2, 16))
    a, b = eng.decode_images(tokens), ref.decode_images(tokens)
    assert a.shape == (2, 64, 64, 3) and a.dtype == torch.uint8
    assert (a.int() - b.int()).abs().max() <= 1  # uint8 rounding of ~1e-6 float differences
    assert np.load(tiny_images_engine / "codebook.npy").shape == (16384, 8)


# -- refusals ---------------------------------------------------------------------------------------

def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_corrupt_onnx_is_refused(tiny_images_engine, tmp_path):
    d = _copy(tiny_images_engine, tmp_path)
    data = bytearray((d / "model.onnx").read_bytes())
    data[100:120] = b"\xff" * 20
    (d / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="model.onnx does not match its sha256"):
        open_engine(str(d), "ort")
    with pytest.raises(ArexportError, match="ONNX Runtime cannot load .*model.onnx"):
        open_engine(str(d), "ort", verify_hashes=False)


def test_truncated_and_missing_files_are_refused(tiny_images_engine, tmp_path):
    d = _copy(tiny_images_engine, tmp_path)
    w = d / "weights.bin"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ManifestError, match="weights.bin has 1000 bytes, the manifest says"):
        open_engine(str(d), "ort")
    (d / "vq_decoder.onnx").unlink()
    with pytest.raises(ManifestError, match="file vq_decoder.onnx listed in the manifest is missing"):
        open_engine(str(d), "ort", verify_hashes=False)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(format_version=99), "format version 99 is newer than this arexport understands"),
    (lambda m: m.update(format="something-else"), "unknown format 'something-else'"),
    (lambda m: m.pop("graphs"), "missing fields: graphs"),
    (lambda m: m["spec"].pop("vocab_size"), "malformed model spec"),
])
def test_bad_manifests_are_refused(tiny_images_engine, tmp_path, edit, match):
    d = _copy(tiny_images_engine, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=match):
        open_engine(str(d), "ort")


def test_not_an_engine_dir(tmp_path):
    with pytest.raises(ManifestError, match="is not an engine directory: no manifest.json"):
        open_engine(str(tmp_path), "ort")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="is not valid JSON"):
        open_engine(str(tmp_path), "ort")


def test_trt_plan_for_another_gpu_or_version_is_refused():
    from arexport.runtime.backends.trt.loader import check_plan_compat

    info = {"version": "10.15.1", "gpu": {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}}
    with pytest.raises(ArexportError, match=r"built for NVIDIA A100-SXM4-80GB \(compute capability 8.0\), this GPU is NVIDIA H100 80GB HBM3 \(compute capability 9.0\)"):
        check_plan_compat(info, "10.15.1", {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"})
    with pytest.raises(ArexportError, match="built with TensorRT 10.15.1, this machine has 11.0.0"):
        check_plan_compat(info, "11.0.0", {"name": "x", "compute_capability": "8.0"})
    check_plan_compat(info, "10.15.1", {"name": "NVIDIA A100-PCIE-40GB", "compute_capability": "8.0"})


def test_trt_profiles_cover_every_step_shape():
    from arexport.format.profiles import graph_profiles, select_profile, step_profiles

    prof = step_profiles([1, 2, 4], 16)
    assert len(prof) == 2
    assert prof[select_profile(prof, "decode", 3, 1)] == {"kind": "decode", "batch": [1, 4, 4], "q": [1, 1, 1]}
    assert prof[select_profile(prof, "verify", 4, 7)]["q"] == [2, 16, 16]
    with pytest.raises(ArexportError, match="no TensorRT profile for verify with batch 5"):
        select_profile(prof, "verify", 5, 16)
    vq = graph_profiles("vq_decoder", [1, 8])
    assert select_profile(vq, "vq_decoder", 5, 0) == 0


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    import arexport.exporter.export as export_mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "export_image_decoder", boom)
    lm = load_model("demo")
    out = tmp_path / "eng"
    with pytest.raises(KeyboardInterrupt):
        build_engine(lm, out, BuildOptions(batch_sizes=[1], verify_len=2))
    assert not out.exists()
    assert os.listdir(tmp_path) == []
    # An existing engine survives a failed --overwrite rebuild untouched (--overwrite replaces only
    # directories whose manifest says they are arexport's).
    out.mkdir()
    old = '{"format": "arexport-engine", "note": "old"}'
    (out / "manifest.json").write_text(old)
    with pytest.raises(KeyboardInterrupt):
        build_engine(lm, out, BuildOptions(batch_sizes=[1], verify_len=2, overwrite=True))
    assert (out / "manifest.json").read_text() == old
    assert sorted(os.listdir(tmp_path)) == ["eng"]


def test_existing_directory_needs_overwrite(tmp_path):
    (tmp_path / "eng").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        build_engine(load_model("demo"), tmp_path / "eng", BuildOptions(batch_sizes=[1], verify_len=2))


trt = pytest.importorskip  # alias for readability below


def _tensorrt_or_skip():
    try:
        from arexport.devices import require_tensorrt

        require_tensorrt()
    except Exception as e:  # BackendUnavailable with the reason
        pytest.skip(f"TensorRT engine tests need TensorRT >= 10.15 and a CUDA GPU: {e}")


def test_tensorrt_engine_matches_pytorch(tmp_path):
    """Builds a real TensorRT plan and checks it like the ORT engine (skips where TensorRT is absent)."""
    _tensorrt_or_skip()
    lm = load_model("llamagen-c2i-B", random_init=True, seed=7, overrides={"n_layer": 2, "dim": 128, "n_head": 4, "grid_size": 4, "multiple_of": 64})
    out = tmp_path / "trt"
    build_engine(lm, out, BuildOptions(batch_sizes=[2, 4], verify_len=4, backend="trt"))
    eng = open_engine(str(out), "trt", device="cuda")
    ref = open_directory("torch", eng.directory, eng.manifest, device="cuda")
    rep = verify_engine(eng, ref, "fp32", batch=2, verify_len=4, full_image=True, n_images=2)
    assert rep.passed and rep.token_agreement == 1.0


def test_trt_backend_without_tensorrt_fails_clearly(tiny_images_engine):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; this checks the message when it is not")
    except ImportError:
        pass
    with pytest.raises(ArexportError, match="TensorRT is not installed"):
        open_engine(str(tiny_images_engine), "trt", device="cuda")


@pytest.fixture(scope="session")
def demo_draft_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "demo-draft"
    build_engine(load_model("demo-draft"), out, BuildOptions(batch_sizes=[1, 2, 4], verify_len=8))
    return out


@pytest.mark.parametrize("method,opts", [("ar", {}), ("sjd", {"window": 8}), ("sd", {"gamma": 4}), ("lantern", {"delta": 0.2, "gamma": 4}),
                                         ("lantern", {"drafter": "sjd", "window": 6})])
def test_every_method_same_tokens_on_torch_and_ort(demo_engine, demo_draft_engine, method, opts):
    from arexport.runtime.generator import Generator
    from arexport.runtime.sampling import SamplingParams

    params = SamplingParams(cfg_scale=1.5)
    ort_gen = Generator.load(str(demo_engine), backend="ort", draft=str(demo_draft_engine))
    torch_gen = Generator.load("demo", backend="torch", draft="demo-draft")
    a = ort_gen.generate(classes=[0, 3, 8], method=method, method_options=opts, sampling=params, seed=9, images=False)
    b = torch_gen.generate(classes=[0, 3, 8], method=method, method_options=opts, sampling=params, seed=9, images=False)
    assert np.array_equal(a.tokens, b.tokens)
    assert a.stats["target_forwards"] == b.stats["target_forwards"]
    assert np.load(demo_engine / "neighbors.npy").shape == (17, 16)
