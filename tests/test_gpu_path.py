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
                   {n: t.data_ptr() for n, t in entry.inputs.items()}, entry.outputs["logits"].data_ptr())
            assert seen.setdefault(key, now) == now, "a static launch was rebound or its buffers moved"
            bound = entry.binding.bound
            assert all(bound[n][0] == t.data_ptr() for n, t in entry.inputs.items())
            assert bound["out:logits"][0] == entry.outputs["logits"].data_ptr()
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
    """ORT's CUDA-graph replay needs IOBinding on fixed buffers: the graph of every declared step kind
    (the runner drives each through _StaticIO) gets enable_cuda_graph, including kinds declared after
    the step and prefill graphs (token_hidden's step_hidden); the numpy-fed sessions (VAR's
    next_scale_*, latent_decoder, vq_decoder, text_encoder) never do."""
    from arexport.format.stepkinds import STEP_KINDS
    from arexport.runtime.backends.ort.loader import cuda_graph_graphs, providers_for

    base = [("CUDAExecutionProvider", {"device_id": "0", "enable_cuda_graph": "1"}), "CPUExecutionProvider"]
    graphs = cuda_graph_graphs()
    assert graphs == {k.graph for k in STEP_KINDS.values()} and {"step", "prefill", "step_hidden"} <= graphs
    for graph in graphs:
        assert providers_for(graph, base)[0][1]["enable_cuda_graph"] == "1"
    for graph in ("next_scale_0", "next_scale_9", "latent_decoder", "vq_decoder", "text_encoder"):
        got = providers_for(graph, base)
        assert "enable_cuda_graph" not in got[0][1] and got[0][1]["device_id"] == "0" and got[1] == "CPUExecutionProvider"
    assert base[0][1]["enable_cuda_graph"] == "1"  # the directory's providers are not modified


# -- support tables and coverage (inspect --target) ---------------------------------------------

def _one_node(op: str, opset: int, dtype, n_inputs: int = 1, **attrs):
    """A one-node ONNX model of `op` at `opset` on [2, 3] tensors of `dtype` (Clip's min/max scalars)."""
    from onnx import helper

    ins = [helper.make_tensor_value_info(f"x{i}", dtype, [] if op == "Clip" and i else [2, 3]) for i in range(n_inputs)]
    out = helper.make_tensor_value_info("y", dtype, None)
    node = helper.make_node(op, [i.name for i in ins], ["y"], **attrs)
    g = helper.make_graph([node], "g", ins, [out])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


# (op, opset, dtype, inputs, attrs): no CPU kernel in the table for these types (and no function body)
# (ReduceL2, Clip with bounds and Gelu are ONNX functions: ONNX Runtime inlines them, and their bodies
# need bf16 Mul / Less / Sqrt kernels the CPU provider lacks)
MISSING_ON_CPU = [("ReduceL2", 18, "BFLOAT16", 1, {}), ("Clip", 13, "BFLOAT16", 3, {}), ("Gelu", 20, "BFLOAT16", 1, {}),
                  ("Add", 14, "BFLOAT16", 2, {}), ("Sigmoid", 13, "BFLOAT16", 1, {})]
PRESENT_ON_CPU = [("ReduceL2", 18, "FLOAT", 1, {}), ("Clip", 13, "FLOAT", 3, {}), ("Gelu", 20, "FLOAT", 1, {}),
                  ("Add", 14, "FLOAT16", 2, {}), ("Sigmoid", 13, "FLOAT", 1, {}), ("Clip", 13, "BFLOAT16", 1, {})]


@pytest.mark.parametrize("case", MISSING_ON_CPU + PRESENT_ON_CPU, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_cpu_table_agrees_with_the_installed_onnxruntime(case, tmp_path):
    """What the CPU table (onnxruntime 1.27.0's registry) says is missing really fails to load in the
    installed CPU onnxruntime, and what it says is there (float16 via ORT's inserted Casts) loads."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto

    from arexport.format.coverage import check_graph

    op, opset, dtype, n, attrs = case
    path = tmp_path / "m.onnx"
    onnx.save(_one_node(op, opset, getattr(TensorProto, dtype), n, **attrs), str(path))
    findings = check_graph(path, "cpu")
    fails = [f for f in findings if f.severity == "fail"]
    if case in MISSING_ON_CPU:
        assert fails and "kernel" in fails[0].reason, findings
        with pytest.raises(Exception, match="(?i)not_implemented|could not find an implementation|invalid"):
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    else:
        assert not fails, findings
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_tables_record_their_sources_and_versions():
    from arexport.format.coverage import load_table

    cpu, cuda, trt = (load_table(t) for t in ("cpu", "cuda", "trt"))
    assert cpu["onnxruntime"] == cuda["onnxruntime"] == "1.27.0" and "get_all_opkernel_def" in cuda["source"]
    assert cuda["provider"] == "CUDAExecutionProvider" and trt["tensorrt"] == "10.15" and trt["opset"] == [9, 24]
    # what issue 29 found, as the tables record it
    assert not any("bfloat16" in k["constraints"]["T"] for k in cuda["ops"]["ai.onnx:ReduceL2"])
    assert "ai.onnx:GroupNormalization" not in cuda["ops"]
    assert [k["range"] for k in cuda["ops"]["ai.onnx:TensorScatter"]] == [[24, None]]
    assert trt["document"]["header"] == "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24"
    assert "no difference" in trt["document"]["checked"]


def test_trt_table_builder_records_the_document_and_refuses_another_release(tmp_path):
    """scripts/build_support_tables.py trt: the table records the document's header, length and
    sha256 and the commit given; a document whose header names another release is refused."""
    import hashlib
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bst", Path(__file__).parent.parent / "scripts" / "build_support_tables.py")
    bst = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bst)
    rows = "".join(f"| Op{i} | Y | FP32, BF16 |\n" for i in range(120))
    md = tmp_path / "operators.md"
    md.write_text("TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24.\n\n" + rows)
    bst._set_out(tmp_path)
    bst.trt_table(md, "10.15", "test", "abc123")
    table = json.loads((tmp_path / "trt.json").read_text())
    assert table["document"] == {"header": "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24",
                                 "chars": len(md.read_text()), "sha256": hashlib.sha256(md.read_bytes()).hexdigest(), "commit": "abc123"}
    assert table["ops"]["ai.onnx:Op7"] == {"supported": True, "types": ["float", "bfloat16"], "restrictions": ""}
    with pytest.raises(SystemExit, match="names TensorRT 10.15, not 10.16"):
        bst.trt_table(md, "10.16", "test")


def test_open_ended_kernels_serve_only_their_start_version(tmp_path):
    """ONNX Runtime matches a kernel `N+` only to nodes of since-version N: a Reshape at opset 25
    (since-version 25) has a CUDA kernel in 1.27, an Unsqueeze-13 node (opset 13..20) a closed range."""
    import onnx
    from onnx import TensorProto

    from arexport.format.coverage import _ort_kernel, _nodes, load_table

    cuda = load_table("cuda")
    m = _one_node("Sigmoid", 13, TensorProto.FLOAT)
    node = _nodes(m)[0]
    assert node.since == 13 and _ort_kernel(cuda, node) is None
    node.since = 14  # a since-version between two kernels' starts with an open-ended one below: not served
    assert "no CUDAExecutionProvider kernel for Sigmoid-14" in _ort_kernel(cuda, node)


def test_trt_refuses_uint8_inside_the_network_and_integer_clip(tmp_path):
    """The checks that caught the image decoders' uint8 Transpose and the integer Clip (issue 29 item 4)."""
    import onnx
    from onnx import TensorProto, helper

    from arexport.format.coverage import check_graph

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, None)
    for order, bad in ((["Cast", "Transpose"], True), (["Transpose", "Cast"], False)):
        nodes, src = [], "x"
        for i, op in enumerate(order):
            out = "y" if i == len(order) - 1 else f"t{i}"
            nodes.append(helper.make_node(op, [src], [out], **({"to": TensorProto.UINT8} if op == "Cast" else {"perm": [0, 3, 1, 2]})))
            src = out
        path = tmp_path / f"{order[0]}.onnx"
        onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 24)]), str(path))
        fails = [f for f in check_graph(path, "trt") if f.severity == "fail"]
        assert bool(fails) == bad and (not bad or "UINT8" in fails[0].reason)
    path = tmp_path / "clip.onnx"
    onnx.save(_one_node("Clip", 13, TensorProto.INT64), str(path))
    assert any("Clip in int64" in f.reason for f in check_graph(path, "trt"))
    onnx.save(_one_node("Min", 13, TensorProto.INT64, 2), str(path))
    assert not check_graph(path, "trt")


def test_inspect_target_cli_on_the_demo_engine(demo_engine):
    from click.testing import CliRunner

    from arexport.cli import cli

    for target, table in (("cuda", "onnxruntime-gpu 1.27.0"), ("trt", "TensorRT 10.15"), ("cpu", "onnxruntime 1.27.0")):
        r = CliRunner().invoke(cli, ["inspect", str(demo_engine), "--target", target])
        assert r.exit_code == 0 and table in r.output and "step: every node supported" in r.output, r.output
        assert "vq_decoder: every node supported" in r.output, r.output


# -- every family x precision the exporter accepts, on the GPU targets ------------------------

def _tiny(family: str, tmp_path_factory):
    """A small model of each family with its image decoder where one can be built without weights."""
    from arexport.models.registry import load_model

    tiny = {"n_layer": 2, "dim": 64, "n_head": 4, "grid_size": 4, "multiple_of": 32}
    if family == "llamagen-c2i":
        return load_model("demo")  # LlamaGen architecture, with the digits decoder
    if family == "llamagen-t2i":
        return load_model("llamagen-t2i-B", random_init=True, seed=2, overrides=dict(tiny, cls_token_num=6, caption_dim=32))
    if family == "arpg":
        return load_model("arpg-L", random_init=True, seed=3, overrides=dict(tiny))
    if family == "rar":
        return load_model("rar-b", random_init=True, seed=5, overrides=dict(dim=64, n_layer=2, n_head=4, intermediate_size=96,
                                                                            num_classes=10, vocab_size=40, grid_size=4))
    if family == "par":
        return load_model("par-XL-4x", random_init=True, seed=6, overrides=dict(tiny))
    if family == "var":
        return load_model("demo-var")  # with its VQVAE: next-scale and latent decoder graphs
    if family == "janus":
        from test_janus import make_janus

        d = tmp_path_factory.mktemp("janus") / "Janus-Pro-tiny"
        make_janus(d)
        return load_model("janus-pro", checkpoint=str(d), overrides={"prompt_slots": 16})
    raise AssertionError(family)


FAMILIES = ["llamagen-c2i", "llamagen-t2i", "arpg", "rar", "var", "janus", "par"]
PRECISIONS = ["fp32", "fp16", "bf16"]
REFUSED: dict[tuple[str, str], str] = {}  # (family, precision) -> the named error a build raises; none today


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(family, precision) -> engine directory, each built at most once in this module and shared by
    the tests below (the coverage checks, the Cast bounds, the static-I/O check). Each family's model
    is loaded once and copied per build (a build casts the model it is given). The fp32 demo build
    also exports the extra step kind it implements (token_hidden), for the static-I/O test; the
    image decoders (and VAR's next-scale graphs) are exported in each build's precision
    (exporter/build._export_decoders; fp16 where the calibration on these weights allows it)."""
    import copy

    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.families import get_family

    models, dirs = {}, {}

    def get(family: str, precision: str):
        if (family, precision) not in dirs:
            if family not in models:
                models[family] = _tiny(family, tmp_path_factory)
            loaded = copy.deepcopy(models[family])
            own = get_family(loaded.spec.family).steps(loaded.spec)
            extra = tuple(k for k in loaded.model.step_kinds if k not in own and k != "multi_query") \
                if (family, precision) == ("llamagen-c2i", "fp32") else ()  # token_hidden, once
            out = tmp_path_factory.mktemp(f"{family}-{precision}") / "eng"
            opts = BuildOptions(precision=precision, batch_sizes=[2], verify_len=None if family in ("arpg", "var") else 4,
                                images=family in ("llamagen-c2i", "var", "rar", "janus"), steps=extra)
            if (family, precision) in REFUSED:
                return opts, loaded, out
            build_engine(loaded, out, opts)
            dirs[(family, precision)] = out
        return dirs[(family, precision)]

    get.models = models  # family -> the loaded model each build copied (its decoder still fp32)
    return get


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_and_precision_runs_on_cuda_and_tensorrt(family, precision, built):
    """The build checks --target cuda and --target trt (exporter/trt_build.check_targets) and refuses
    with TargetUnsupported otherwise; every family x precision builds, and inspect agrees: no node
    fails or falls back to the CPU on ONNX Runtime CUDA, none fails TensorRT's parser. On the CPU
    target, fp32/fp16 engines have no failing node and load in the installed onnxruntime; bf16
    engines have failing nodes and really fail to load (ORT's CPU provider has no bf16 MatMul, nor
    bf16 Conv for the decoders, which are bf16 too)."""
    import onnxruntime as ort
    from click.testing import CliRunner

    from arexport.cli import cli
    from arexport.exporter.build import build_engine
    from arexport.format.coverage import TargetUnsupported, check_directory
    from arexport.format.manifest import read_manifest

    if (family, precision) in REFUSED:
        opts, loaded, out = built(family, precision)
        with pytest.raises(TargetUnsupported, match=REFUSED[(family, precision)]):
            build_engine(loaded, out, opts)
        return
    out = built(family, precision)
    manifest = read_manifest(out)
    for target in ("cuda", "trt"):
        blocking = [f.line() for fs in check_directory(out, manifest, target).values() for f in fs
                    if f.severity in ("fail", "fallback")]
        assert not blocking, blocking
        assert CliRunner().invoke(cli, ["inspect", str(out), "--target", target]).exit_code == 0
    cpu = check_directory(out, manifest, "cpu")
    fails = [f for fs in cpu.values() for f in fs if f.severity == "fail"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if precision == "bf16":
        decoders = {n for n in manifest.graphs if n.startswith("next_scale_") or n in ("latent_decoder", "vq_decoder")}
        assert fails and all(f.graph in {"step", "prefill"} | decoders for f in fails)
        with pytest.raises(Exception):
            ort.InferenceSession(str(out / manifest.graphs["step"].file), so, providers=["CPUExecutionProvider"])
        assert CliRunner().invoke(cli, ["inspect", str(out), "--target", "cpu"]).exit_code == 1
    else:
        assert not fails, [f.line() for f in fails]
        for g in manifest.graphs.values():
            ort.InferenceSession(str(out / g.file), so, providers=["CPUExecutionProvider"])


DECODER_FAMILIES = ["llamagen-c2i", "var", "rar", "janus"]  # the ones built with images above


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_decoders_are_built_in_the_engine_precision(family, precision, built):
    """Issue 29 item 6: a half engine's image decoder (and VAR's next-scale and latent decoder graphs)
    is exported in the engine's precision: the manifest records the decision for every such graph
    (fp16: with the calibration's peak under the limit; a decoder without weights, the demo's digits,
    stays fp32), its convolution weights are in that dtype, ONNX Runtime CUDA inlines nothing in it
    (GroupNorm is a LayerNormalization with kernels, exporter/groupnorm.py), its Casts are the
    GroupNorms' 2 each plus the fp32 islands' and the ends' (and in VAR's tokens -> images graph 2 a
    scale: f_hat sums in fp32), and each island is a node the CUDA table has no half kernel for.
    fp16 MaskGIT-VQGAN (RAR) and Janus VQ graphs, run by ONNX Runtime's CPU provider, give the fp32
    PyTorch decoder's images within 2 levels (mean under 0.5; measured: max 2 and 1, mean 0.06 and 0.08)."""
    import onnx

    from arexport.exporter.calibrate import LIMIT
    from arexport.format.coverage import check_directory
    from arexport.format.manifest import read_manifest

    out = built(family, precision)
    manifest = read_manifest(out)
    records = manifest.export["decoders"]
    names = {n for n in manifest.graphs if n.startswith("next_scale_") or n in ("latent_decoder", "vq_decoder")}
    assert names and set(records) == names, (sorted(records), sorted(names))
    inlined = [f.line() for g, fs in check_directory(out, manifest, "cuda").items() if g in names for f in fs]
    assert not inlined, inlined
    from click.testing import CliRunner

    from arexport.cli import cli

    shown = CliRunner().invoke(cli, ["inspect", str(out)]).output  # inspect prints each decision
    assert all(f"{n}: {records[n]['precision']} (" in shown for n in names), shown
    half = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[precision]
    for name in names:
        rec = records[name]
        proto = onnx.load(str(out / manifest.graphs[name].file), load_external_data=False)
        ops = [n.op_type for n in proto.graph.node]
        if family == "llamagen-c2i":  # the digits decoder: no weights, nothing to run in half
            assert rec["precision"] == "fp32" and "no weights" in rec["why"]
            continue
        assert rec["precision"] == precision, rec
        if precision == "fp16":
            assert 0 < rec["calibration"]["peak"] < LIMIT and rec["calibration"]["grids"] >= 2
        types = {i.name: i.data_type for i in proto.graph.initializer}
        convs = [n for n in proto.graph.node if n.op_type == "Conv"]
        assert convs and all(types.get(n.input[1]) == half for n in convs), name
        island_nodes = sum(r["nodes"] for r in rec["fp32_islands"])
        per_scale = 2 * len(manifest.spec.extra["patch_nums"]) if name == "vq_decoder" and family == "var" else 0  # h in, phi out
        bound = 2 * ops.count("LayerNormalization") + 3 * island_nodes + 4 + per_scale
        assert ops.count("Cast") == rec["casts"] <= bound, (name, rec["casts"], bound)
        assert all("no CUDAExecutionProvider kernel" in r["why"] and r["dtype"] == "bfloat16" for r in rec["fp32_islands"])
    if precision == "fp16" and family in ("rar", "janus"):  # MaskGIT-VQGAN, Janus's VQ: images vs the fp32 decoder
        import onnxruntime as ort

        dec = built.models[family].decoder.float().eval()
        tokens = torch.randint(0, min(manifest.spec.vocab_size, dec.codebook().shape[0]), (2, manifest.spec.n_tokens),
                               generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            want = dec(tokens).numpy().astype(np.int64)
        sess = ort.InferenceSession(str(out / manifest.graphs["vq_decoder"].file), providers=["CPUExecutionProvider"])
        d = np.abs(sess.run(None, {"tokens": tokens.numpy()})[0].astype(np.int64) - want)
        assert ((want > 0) & (want < 255)).mean() > 0.3 and d.mean() <= 0.5 and d.max() <= 2, (d.mean(), d.max())


@pytest.mark.slow
def test_var_fp16_next_scale_and_decoder_graphs_match_fp32_torch(built):
    """The fp16 VAR engine's next-scale graphs and latent decoder, run by ONNX Runtime's CPU provider
    over every scale of the demo's trained VQVAE, against the fp32 PyTorch VQVAE: f_hat within
    2e-3 relative (its sums stay fp32; phi's convolution runs in fp16) and the images within 2
    levels (mean under 0.5). Negative control: a PyTorch reference whose last phi conv is scaled by
    1.05 is outside the f_hat tolerance."""
    import onnxruntime as ort

    from arexport.format.manifest import read_manifest
    from arexport.models.registry import load_model

    out = built("var", "fp16")
    manifest = read_manifest(out)
    vae = load_model("demo-var").decoder.float().eval()
    scales = vae.cfg.scales
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, vae.codebook().shape[0], (2, scales.ends[-1]), generator=g)
    sess = lambda n: ort.InferenceSession(str(out / manifest.graphs[n].file), providers=["CPUExecutionProvider"])  # noqa: E731
    f_ort = np.zeros((2, vae.cfg.cvae, scales.patch_nums[-1], scales.patch_nums[-1]), np.float32)
    with torch.no_grad():
        f_ref = torch.zeros(f_ort.shape)
        for si in range(len(scales)):
            h = vae.codebook()[tokens[:, scales.begins[si]:scales.ends[si]]]
            f_ort = sess(f"next_scale_{si}").run(None, {"f_hat": f_ort, "h": h.numpy()})[0]
            f_ref, _ = vae.next_scale(si, f_ref, h)
        ref = f_ref.numpy()
        scale = np.abs(ref).max()
        assert np.abs(f_ort - ref).max() <= 2e-3 * scale, (np.abs(f_ort - ref).max(), scale)
        images = sess("latent_decoder").run(None, {"f_hat": f_ort})[0]
        want = vae.latents_to_images(f_ref).numpy()
        d = np.abs(images.astype(np.int64) - want.astype(np.int64))
        assert d.max() <= 2 and d.mean() <= 0.5, (d.max(), d.mean())
        vae.phi(len(scales) - 1).weight.mul_(1.05)  # negative control
        f_bad = torch.zeros(f_ort.shape)
        for si in range(len(scales)):
            f_bad, _ = vae.next_scale(si, f_bad, vae.codebook()[tokens[:, scales.begins[si]:scales.ends[si]]])
    assert np.abs(f_ort - f_bad.numpy()).max() > 2e-3 * scale


def _casts(path) -> int:
    import onnx

    return sum(n.op_type == "Cast" for n in onnx.load(str(path), load_external_data=False).graph.node)


# Casts an fp16/bf16 step graph may hold per layer (after issue 29 item 6; before it, LlamaGen's held
# 8 a layer at both precisions: a Cast into and out of each of the 2 RMSNorms and 2 rotations).
# fp16: none for the norms or the rotation (models/fused.py); bf16 keeps the rotation in fp32 (a Cast
# into and out of each rotated tensor: rope.rotary_dtype); VAR's attention L2-normalises q and k in
# fp32 (ReduceL2 has no bf16 CUDA kernel and VAR normalises in fp32 under autocast); Janus runs
# Hugging Face's Llama layers (their RMSNorm casts to fp32 and back).
CASTS_PER_LAYER = {"fp16": {"llamagen-c2i": 0, "llamagen-t2i": 0, "arpg": 0, "rar": 0, "var": 4, "janus": 4, "par": 0},
                   "bf16": {"llamagen-c2i": 4, "llamagen-t2i": 4, "arpg": 4, "rar": 0, "var": 4, "janus": 4, "par": 4}}
# outside the layers: the RoPE rows cast once (two tables for ARPG's two streams), the fp32 logits, RAR's
# condition mask; Janus adds the Hugging Face final norm's pair and its rotary's casts
CASTS_OUTSIDE = {"llamagen-c2i": 6, "llamagen-t2i": 6, "arpg": 6, "rar": 6, "var": 6, "janus": 8, "par": 6}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_step_graphs_hold_few_casts(family, precision, built):
    """The Casts of a half-precision step graph stay under the bound per layer (CASTS_PER_LAYER, plus
    CASTS_OUTSIDE): the norms (and at fp16 the rotation) run in the model's precision (models/fused.py).
    Negative control: the same builds with the fp32 islands back (this branch's parent) hold 35
    Casts in LlamaGen's 4-layer demo step graph, over its bound of 6 (fp16) and 22 (bf16)."""
    from arexport.format.manifest import read_manifest

    out = built(family, precision)
    manifest = read_manifest(out)
    layers = manifest.spec.n_cache_layers
    bound = CASTS_PER_LAYER[precision][family] * layers + CASTS_OUTSIDE[family]
    for name, g in manifest.graphs.items():
        if g.step is not None:
            assert _casts(out / g.file) <= bound, (name, _casts(out / g.file), bound)


def test_plan_compatibility_compares_versions_as_numbers():
    """check_plan_compat compares TensorRT releases as numbers (issue 29: it compared strings)."""
    from arexport.errors import ArexportError
    from arexport.format.versions import release, same_release
    from arexport.runtime.backends.trt.loader import check_plan_compat

    assert release("10.16.1.11.post1") == (10, 16, 1, 11) and release("1.27.0+cu13") == (1, 27, 0)
    assert release("10.9") < release("10.15")  # as strings '10.9' > '10.15'
    assert same_release("10.16.1", "10.16.1.0") and not same_release("10.16.1", "10.16.10")
    gpu = {"name": "H200", "compute_capability": "9.0"}
    info = {"version": "10.16.1.11", "gpu": gpu}
    check_plan_compat(info, "10.16.1.11.post1", gpu)  # the same release repackaged: accepted (was refused)
    for other in ("10.16.1.12", "10.16.10.11", "11.0.0.114"):
        with pytest.raises(ArexportError, match="built with TensorRT 10.16.1.11"):
            check_plan_compat(info, other, gpu)
    with pytest.raises(ArexportError, match="not a version"):
        release("unknown")


def test_trt_version_range_is_enforced(monkeypatch):
    """require_tensorrt accepts the [trt] extra's range 10.15 <= v < 12 only (as numbers)."""
    import sys
    import types

    from arexport.devices import MAX_TRT, MIN_TRT, require_tensorrt
    from arexport.errors import BackendUnavailable

    assert (MIN_TRT, MAX_TRT) == ((10, 15), (12, 0))
    for v, why in (("10.9.0.34", "too old"), ("12.0.1", "newer than")):
        monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=v))
        with pytest.raises(BackendUnavailable, match=why):
            require_tensorrt()


def test_gpu_extra_installs_one_onnxruntime():
    """pyproject: the CPU onnxruntime is not a core dependency (pip would install it next to
    onnxruntime-gpu into the same package folder); [cpu] and [gpu] each bring one, with the 1.27
    floor the support tables were built for, and [gpu] the CUDA 13 runtime libraries its wheels use."""
    import re
    import tomllib
    from pathlib import Path

    py = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    proj = py["project"]
    names = lambda reqs: [re.split(r"[\[<>=~ ;]", r, 1)[0] for r in reqs]  # noqa: E731
    assert "onnxruntime" not in names(proj["dependencies"]) and "onnxruntime-gpu" not in names(proj["dependencies"])
    extras = proj["optional-dependencies"]
    assert names(extras["gpu"]).count("onnxruntime-gpu") == 1 and "onnxruntime" not in names(extras["gpu"])
    assert any(r.startswith("onnxruntime-gpu[cuda,cudnn]>=1.27") for r in extras["gpu"])
    assert any(r.startswith("onnxruntime>=1.27") for r in extras["cpu"]) and "onnxruntime-gpu" not in names(extras["cpu"])
    assert any(r.startswith("tensorrt>=10.15,<12") for r in extras["trt"])
    assert not {"onnxruntime", "onnxruntime-gpu"} & set(names(extras["test"]))  # CI: .[cpu,test]; a GPU box: .[gpu,test]


# -- on a GPU (run by benchmarks/gpu_all.sh; skip with the reason elsewhere) ----------------------

def _no_ort_cuda() -> str:
    """Why ONNX Runtime cannot run on CUDA here ('' when it can)."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch sees none)"
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install arexport[gpu])"
    return ""


@pytest.mark.skipif(bool(_no_ort_cuda()), reason=_no_ort_cuda() or "-")  # before the engine fixture is built
@pytest.mark.parametrize("method,options", [("ar", {}), ("sjd", {"window": 4})])
def test_ort_cuda_graphs_equal_the_cpu_tokens(demo_engine, method, options):
    """ONNX Runtime on CUDA with CUDA graphs: the same greedy tokens as ONNX Runtime on the CPU,
    every launch's bound addresses fixed across the run, and captured replays fed new inputs (the
    tokens would repeat the first step's otherwise)."""
    from arexport.runtime.generator import Generator
    from arexport.runtime.sampling import SamplingParams

    greedy = SamplingParams(temperature=0.0, cfg_scale=3.0)
    args = dict(classes=list(range(4)), method=method, method_options=options, sampling=greedy, images=False)
    cpu = Generator.load(str(demo_engine), backend="ort").generate(**args)
    gen = Generator.load(str(demo_engine), backend="ort", device="cuda", cuda_graph=True)
    first = gen.generate(**args)
    bound = {k: dict(e.binding.bound) for k, e in gen.engine.static.items()}
    again = gen.generate(**args)  # replays of the graphs captured by the first run
    assert (first.tokens == cpu.tokens).mean() >= 0.99 and (again.tokens == first.tokens).all()
    assert all(dict(gen.engine.static[k].binding.bound) == v for k, v in bound.items() if k in gen.engine.static)


def test_trt_attention_restrictions_are_checked(tmp_path):
    """onnx-tensorrt 10.15: Attention without past/present tensors only (the graphs scatter the cache
    with TensorScatter and attend over it with a 4-input Attention)."""
    import onnx
    from onnx import TensorProto, helper

    from arexport.format.coverage import check_graph

    def model(n_in: int, n_out: int):
        ins = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 2, 3, 4]) for x in ["q", "k", "v"]]
        ins.append(helper.make_tensor_value_info("m", TensorProto.BOOL, [1, 1, 3, 3]))
        ins += [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 2, 3, 4]) for x in ["pk", "pv"]][:max(0, n_in - 4)]
        outs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in ["y", "prk", "prv"][:n_out]]
        node = helper.make_node("Attention", [i.name for i in ins], [o.name for o in outs])
        return helper.make_model(helper.make_graph([node], "g", ins, outs), opset_imports=[helper.make_opsetid("", 24)])

    for n_in, n_out, ok in ((4, 1, True), (6, 3, False)):
        onnx.save(model(n_in, n_out), str(tmp_path / "a.onnx"))
        fails = [f for f in check_graph(tmp_path / "a.onnx", "trt") if f.severity == "fail"]
        assert (not fails) == ok, fails


# -- fp16/bf16 engines: the norm and the rotation in the model's precision (issue 29 item 6) ------

@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_fused_norm_and_rotary_in_model_precision_stay_within_tolerance(precision, monkeypatch):
    """An engine's RMSNormalization and RotaryEmbedding run in the model dtype (models/fused.py),
    where the eager model normalises and rotates in fp32. Run the demo (trained weights) eagerly with
    the fused ops' bodies (what the ONNX nodes compute) and without: the logits agree within verify's
    tolerance for the precision, and the engine is not much further from the fp32 model than the
    reference. This covers bf16, which ORT's CPU provider cannot run (no bf16 MatMul). Negative
    controls: a rotation with sin negated is rejected by the tolerance, and rotating a bf16 model in
    bf16 (what rope.rotary_dtype avoids) by the distance to the fp32 model."""
    from arexport.devices import torch_dtype
    from arexport.models import rope
    from arexport.models.fused import fused_export
    from arexport.models.registry import load_model
    from arexport.verify import TOLERANCES

    atol, rtol = TOLERANCES[precision]
    loaded = load_model("demo")
    model = loaded.model.eval()
    g = torch.Generator().manual_seed(4)
    cond = torch.tensor([0, 4, 7, 9])
    tokens = torch.randint(0, loaded.spec.vocab_size, (4, loaded.spec.n_tokens), generator=g)
    far = lambda a: (a - exact).abs().max().item()  # noqa: E731
    with torch.no_grad():
        exact = model(cond, tokens)
        model = model.to_precision(dtype=torch_dtype(precision))
        reference = model(cond, tokens)
        with fused_export():
            engine = model(cond, tokens)
        torch.testing.assert_close(engine, reference, atol=atol, rtol=rtol)
        assert far(engine) <= 1.25 * far(reference) + atol / 10, (far(engine), far(reference))
        if precision == "bf16":
            monkeypatch.setattr(rope, "rotary_dtype", lambda dtype: dtype)
            with fused_export():
                in_bf16 = model(cond, tokens)
            assert far(in_bf16) > 1.25 * far(reference) + atol / 10, (far(in_bf16), far(reference))
            monkeypatch.undo()
        right = torch.ops.arexport.rotary
        monkeypatch.setattr(torch.ops.arexport, "rotary", lambda x, cos, sin: right(x, cos, -sin))
        with fused_export():
            bad = model(cond, tokens)
    assert not torch.allclose(bad, reference, atol=atol, rtol=rtol)


# -- every step kind on static buffers (what ORT's CUDA-graph capture needs), checked on the CPU ----

@pytest.mark.slow
@pytest.mark.parametrize("family", ["llamagen-c2i", "llamagen-t2i", "arpg", "var"])  # token, token_hidden, caption_prefill, multi_query, scale
def test_every_step_kind_runs_on_static_buffers(family, built, monkeypatch):
    """For every step kind these engines run (verify's cases of each declared scenario): each call goes
    through a _StaticIO launch of a graph that gets CUDA graphs (loader.cuda_graph_graphs), whose bound
    addresses and buffers never change across its runs, launches are reused across steps, and every
    output and the cache equal plain session.run on numpy feeds (the non-static path). The capture
    itself needs a GPU (docs/gpu.md says what that leaves unverified)."""
    from arexport.format.stepkinds import get_step_kind
    from arexport.runtime.backends.ort import runner
    from arexport.runtime.backends.ort.loader import cuda_graph_graphs
    from arexport.verify import make_cases, run_case

    out = built(family, "fp32")
    eng, plain = open_engine(str(out), "ort"), open_engine(str(out), "ort")
    kinds = eng.step_kinds()
    launches: dict[int, tuple] = {}
    runs, graphs = [0], set()
    real_run, real_static = runner._StaticIO.run, runner.OrtEngine._static_io

    def checked_run(self, feeds):
        state = (self, dict(self.binding.bound), self.binding.binds,
                 {n: t.data_ptr() for n, t in self.inputs.items()}, {n: t.data_ptr() for n, t in self.outputs.items()})
        assert launches.setdefault(id(self), state)[1:] == state[1:], "a launch was rebound or its buffers moved"
        assert all(self.binding.bound[n][0] == t.data_ptr() for n, t in self.inputs.items())
        assert all(self.binding.bound["out:" + n][0] == t.data_ptr() for n, t in self.outputs.items())
        runs[0] += 1
        return real_run(self, feeds)

    def recording_static(self, graph, feeds, cache, outputs):
        graphs.add(graph)
        return real_static(self, graph, feeds, cache, outputs)

    def plain_run(graph, feeds, cache, outputs):  # the non-static path
        sess = plain.sessions.get(graph)
        names = [o.name for o in sess.get_outputs()]
        bufs = {f"{kind}_{i}": buf for i, (k, v) in enumerate(zip(cache.keys, cache.values)) for kind, buf in (("key", k), ("value", v))}
        res = dict(zip(names, sess.run(names, {**{n: t.numpy() for n, t in feeds.items()},
                                                **{f"past_{n}": b.numpy().copy() for n, b in bufs.items()}})))
        for n, b in bufs.items():
            b.copy_(torch.from_numpy(res[f"present_{n}"]))
        return {n: torch.from_numpy(res[n]) for n in outputs}

    monkeypatch.setattr(runner._StaticIO, "run", checked_run)
    monkeypatch.setattr(runner.OrtEngine, "_static_io", recording_static)
    plain._run = plain_run
    for case in make_cases(eng.spec, 2, 4, seed=0, steps=kinds):
        got, want = run_case(eng, case), run_case(plain, case)
        assert got.keys() == want.keys()
        for name in got:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert graphs == {get_step_kind(k).graph for k in kinds} and graphs <= cuda_graph_graphs(), (graphs, kinds)
    if family != "var":  # VAR's scales each step a query length of their own: every launch runs once a case
        assert runs[0] > len(launches)  # launches were reused across steps, not rebound per call
