"""An exported draft-head directory (`arexport build-head`) in verify, calibrate and profile."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from arexport.cli import cli

pytest.importorskip("onnxruntime")
pytest.importorskip("polygraphy")


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory):
    """demo-eagle exported once for the demo (8 pairs per call, batch 4, 88 cache slots)."""
    out = tmp_path_factory.mktemp("heads") / "demo-eagle"
    r = CliRunner().invoke(cli, ["build-head", "demo-eagle", "--model", "demo", "--out", str(out), "--verify-len", "8",
                                 "--batch-sizes", "4", "--extra-slots", "24"])
    assert r.exit_code == 0, r.output
    return out


def test_verify_checks_a_head_directory_and_rejects_a_perturbed_one(demo_engine, head_dir, tmp_path):
    """`verify ENGINE --draft-head DIR` compares logits, hidden state and every cache after the call with the
    PyTorch head (fp32 tolerances); a head whose weights file was perturbed fails (exit 1), and a head
    directory built for another target is refused in one line naming both."""
    js = tmp_path / "head.json"
    r = CliRunner().invoke(cli, ["verify", str(demo_engine), "--draft-head", str(head_dir), "--json", str(js)])
    assert r.exit_code == 0, r.output
    rep = json.loads(js.read_text())
    outs = {row["output"] for row in rep["rows"]}
    assert {"logits", "hidden_out", "present_key_0", "present_value_0"} <= outs and rep["passed"]
    assert max(row["max_abs"] for row in rep["rows"]) < 1e-4

    # negative control: the same directory with a few of its weights scaled by 1.01
    bad = tmp_path / "bad"
    shutil.copytree(head_dir, bad)
    info = json.loads((bad / "head.json").read_text())
    w = bad / info["weights"]
    arr = np.fromfile(w, dtype=np.float32)
    arr[len(arr) // 2: len(arr) // 2 + 512] *= 1.01
    arr.tofile(w)
    r = CliRunner().invoke(cli, ["verify", str(demo_engine), "--draft-head", str(bad), "--json", str(js)])
    assert r.exit_code == 1 and "FAIL" in r.output, r.output
    assert not json.loads(js.read_text())["passed"]

    # a head directory for another target (here: one whose head.json names 100 image tokens)
    other = tmp_path / "other"
    shutil.copytree(head_dir, other)
    info["n_tokens"] = 100
    (other / "head.json").write_text(json.dumps(info))
    r = CliRunner().invoke(cli, ["verify", str(demo_engine), "--draft-head", str(other)])
    assert r.exit_code != 0 and "built for a target of width 96, vocabulary 17 and 100 image tokens" in r.output, r.output
    assert "demo has 96, 17 and 64" in r.output
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(cli, ["verify", str(demo_engine), "--draft-head", str(tmp_path / "empty")])
    assert r.exit_code != 0 and "not a head directory" in r.output, r.output


def test_calibrate_refuses_what_it_cannot_tune_for_heads(demo_engine, head_dir, tmp_path):
    """calibrate tunes nothing for a draft head (it quantizes the target's step graphs, chooses no draft length
    or tree, and the head stays fp32): `--draft-head` is refused with that reason, before anything is written.
    (Engines with the hidden-state graphs heads read are quantized: tests/test_calibrate_hidden_graphs.py.)"""
    r = CliRunner().invoke(cli, ["calibrate", str(demo_engine), "--mode", "int8", "--out", str(tmp_path / "q"),
                                 "--draft-head", str(head_dir)])
    assert r.exit_code != 0 and "nothing to tune for the draft head" in r.output, r.output
    assert not (tmp_path / "q").exists()


def test_calibrate_hidden_graph_check_passes_a_token_only_engine(demo_engine):
    """Control for the refusal above: the same check lets an engine with only its token step through."""
    from arexport.calibration.calibrate import _refuse_unquantized_step_graphs
    from arexport.format.manifest import read_manifest

    _refuse_unquantized_step_graphs(demo_engine, read_manifest(demo_engine))


def test_profile_reports_the_head_as_its_own_step(head_dir, tmp_path, monkeypatch):
    """`profile --method eagle` with an exported head: every head call is a `draft_head` step of its own (as many
    as the head ran), kept out of the target's engine time and out of the host time, so engine + head + host
    (+ image decoding) add up to the measured wall time and the target's ms/step is its steps' only."""
    from arexport.runtime.backends.ort.head import OrtDraftHead
    from arexport.runtime.engine import NOT_FORWARDS

    calls = []
    orig = OrtDraftHead.step
    monkeypatch.setattr(OrtDraftHead, "step", lambda self, *a: calls.append(1) or orig(self, *a))
    out = tmp_path / "p.json"
    r = CliRunner().invoke(cli, ["profile", "--model", "demo", "--method", "eagle", "--option", f"draft_head={head_dir}",
                                 "--option", "tree=static", "--classes", "2", "--warmup", "0", "--repeats", "1",
                                 "--no-bandwidth", "--quality-images", "0", "--json", str(out)])  # quality images call the head untimed
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())["results"][0]
    steps = res["steps"]
    assert steps["draft_head"]["count"] == len(calls) > 0
    total = {k: s["mean_ms"] * s["count"] for k, s in steps.items()}
    n = sum(s["count"] for k, s in steps.items() if k not in NOT_FORWARDS)
    assert n == res["target_forwards_per_image"]  # one image
    target = sum(v for k, v in total.items() if k not in ("vq_decode", "latent_decode", "draft_head"))
    assert res["engine_ms_per_step"] == pytest.approx(target / n, rel=1e-6)
    assert res["head_ms_per_step"] == pytest.approx(total["draft_head"] / n, rel=1e-6) and res["head_ms_per_step"] > 0
    wall_ms = res["image_ms"]["p50"] * res["images"]  # one timed repeat
    assert res["host_ms_per_step"] * n == pytest.approx(wall_ms - sum(total.values()), rel=1e-6, abs=1e-6)


def test_t2i_caption_prefill_feeds_the_head_so_round_one_drafts(tiny_t2i, tmp_path, monkeypatch):
    """A t2i caption prefill through `caption_prefill_hidden` hands the head every caption position's hidden
    state (the output head's input: the last one's projection is the prefill's logits), so round one drafts (control: the
    same target without that step makes fewer head calls, round one's); greedy eagle equals greedy ar
    whatever the tree, with and without it."""
    import torch

    from arexport.models.eagle import EagleConfig, EagleHead, save_eagle_head
    from arexport.runtime.backends.torch.runner import TorchEngine
    from arexport.runtime.generator import Generator
    from arexport.runtime.sampling import SamplingParams

    lm = tiny_t2i
    m = lm.model
    head = EagleHead(EagleConfig(dim=64, n_head=4, n_kv_head=4, ffn_hidden=64, vocab_size=lm.spec.vocab_size,
                                 grid_size=lm.spec.grid_size)).init_random(5, std=0.3)
    with torch.no_grad():
        head.embed_tokens.weight.copy_(m.tok_embeddings.weight)
        head.lm_head.weight.copy_(m.output.weight)
    path = tmp_path / "t2i-head.safetensors"
    save_eagle_head(head, path)
    emb = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))

    # the graph's hidden output is the output head's input, and its logits are the plain prefill's
    c = m.cfg
    kvh = c.n_kv_head or c.n_head
    bufs = lambda: ([torch.zeros(2, kvh, 6, c.dim // c.n_head) for _ in range(c.n_layer)],  # noqa: E731
                    [torch.zeros(2, kvh, 6, c.dim // c.n_head) for _ in range(c.n_layer)])
    mask = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6)
    with torch.no_grad():
        logits, hidden, _, _ = m.prefill_embeds_hidden(emb, mask, *bufs())
        plain, _, _ = m.prefill_embeds(emb, mask, *bufs())
        assert hidden.shape == (2, 6, 64)  # every caption position
        assert torch.allclose(m.output(hidden[:, -1]).float(), logits) and torch.allclose(plain, logits)

    def eagle_stats(engine_kinds=None, trees=("static", "dynamic")):
        if engine_kinds is not None:
            monkeypatch.setattr(type(m), "step_kinds", property(lambda self: engine_kinds))
        gen = Generator(TorchEngine(lm))
        kw = dict(captions=emb, seed=0, images=False, sampling=SamplingParams(temperature=0.0, cfg_scale=2.0))
        ar = gen.generate(method="ar", timings=False, **kw)
        out = []
        for tree in trees:
            res = gen.generate(method="eagle", method_options={"draft_head": str(path), "tree": tree}, timings=True, **kw)
            assert np.array_equal(res.tokens, ar.tokens), tree
            out.append(res.stats)
        return out

    a = eagle_stats()
    without = tuple(k for k in m.step_kinds if k != "caption_prefill_hidden")
    b = eagle_stats(without, trees=("static",))
    # round one's catch-up and tree levels are head calls the image without a caption hidden state skips
    assert all(x["draft_forwards_per_image"] > y["draft_forwards_per_image"] for x, y in zip(a, b)), (a, b)
    assert a[0]["target_forwards_per_image"] == b[0]["target_forwards_per_image"]  # the head accepts nothing here


def test_verify_compares_the_t2i_hidden_prefill(tiny_t2i):
    """`verify` runs a case for `caption_prefill_hidden` (logits, hidden state, the caption's K/V); an engine whose
    hidden output is off by 1e-3 fails on that row only (negative control)."""
    from arexport.runtime.backends.torch.runner import TorchEngine
    from arexport.verify import verify_engine

    ref, eng = TorchEngine(tiny_t2i), TorchEngine(tiny_t2i)
    rep = verify_engine(eng, ref, "fp32", batch=2, verify_len=4, full_image=False)
    rows = [r for r in rep.rows if "caption_prefill_hidden" in r["case"]]
    assert rep.passed and {r["output"] for r in rows} >= {"logits", "hidden", "new_key_0", "new_value_1"}
    forward = eng._forward

    def off(kind, cache, feeds):
        out = forward(kind, cache, feeds)
        if kind.name == "caption_prefill_hidden":
            out = dict(out, hidden=out["hidden"] + 1e-3)
        return out

    eng._forward = off
    rep = verify_engine(eng, ref, "fp32", batch=2, verify_len=4, full_image=False)
    assert [(r["case"], r["output"]) for r in rep.rows if not r["passed"]] == [(rows[0]["case"], "hidden")]


def test_ort_head_writes_its_cache_in_place_and_equals_a_plain_run(head_dir, capfd):
    """OrtDraftHead binds each K/V buffer as past_* and present_* (IOBinding), so the graph's TensorScatter writes
    the pairs into the caller's buffers with no copy: over calls of other shapes, on row slices of the buffers and
    on a second cache (each its own standing binding), logits, hidden_out and every cache buffer equal a plain
    session.run fed copies of the cache (bit for bit), the buffers never move, and ORT logs no in-place fallback.
    Control: the same session run plainly does log the fallback (so the log check can fail, e.g. on the earlier
    runner, which fed numpy copies and copied present_* back); a strided buffer is refused."""
    import torch

    from arexport.errors import ArexportError
    from arexport.runtime.backends.ort.head import OrtDraftHead

    head = OrtDraftHead(str(head_dir), 96, 17)
    plain = head.session  # the same session run without a binding: the reference, and the log control
    g = torch.Generator().manual_seed(3)
    caches = [head.allocate(4, 20) for _ in range(2)]
    refs = [([k.clone() for k in ks], [v.clone() for v in vs]) for ks, vs in caches]
    ptrs = [t.data_ptr() for ks, vs in caches for t in ks + vs]
    capfd.readouterr()
    for c, rows, q, w0 in ((0, (0, 4), 3, 0), (0, (0, 4), 1, 3), (1, (0, 2), 4, 0), (0, (1, 3), 2, 4), (1, (0, 2), 4, 4),
                           (0, (0, 2), 4, 8), (0, (0, 4), 1, 12)):  # (0, 2) q 4 on both caches: same shapes, other buffers
        r0, r1 = rows
        b = r1 - r0
        hidden = torch.randn(b, q, 96, generator=g)
        tokens = torch.randint(0, 17, (b, q), generator=g)
        write = torch.full((b,), w0) + torch.arange(b) % 2
        positions = write[:, None] + torch.arange(q)[None, :]
        mask = (torch.arange(head.slots)[None, None, :] <= positions[:, :, None])[:, None]
        ks, vs = [k[r0:r1] for k in caches[c][0]], [v[r0:r1] for v in caches[c][1]]
        logits, out, _, _ = head.step(hidden, tokens, positions, write, mask, ks, vs)
        rk, rv = [k[r0:r1] for k in refs[c][0]], [v[r0:r1] for v in refs[c][1]]
        feeds = {"hidden": hidden.numpy(), "tokens": tokens.numpy(), "positions": positions.numpy(),
                 "write_index": write.numpy(), "attn_mask": mask.numpy()}
        for i, (k, v) in enumerate(zip(rk, rv)):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = k.numpy().copy(), v.numpy().copy()
        names = ["logits", "hidden_out"] + [f"present_{n}_{i}" for i in range(len(rk)) for n in ("key", "value")]
        err = capfd.readouterr().err
        assert "in-place optimization not activated" not in err, err
        ref = plain.run(names, feeds)
        assert "in-place optimization not activated" in capfd.readouterr().err  # the control: a plain run copies
        for i in range(len(rk)):
            rk[i].copy_(torch.from_numpy(ref[2 + 2 * i]))
            rv[i].copy_(torch.from_numpy(ref[3 + 2 * i]))
        assert torch.equal(logits, torch.from_numpy(ref[0])) and torch.equal(out, torch.from_numpy(ref[1]))
        for a, r in zip(caches[0][0] + caches[0][1] + caches[1][0] + caches[1][1], refs[0][0] + refs[0][1] + refs[1][0] + refs[1][1]):
            assert torch.equal(a, r)
    assert [t.data_ptr() for ks, vs in caches for t in ks + vs] == ptrs
    assert not torch.equal(caches[0][0][0], torch.zeros_like(caches[0][0][0])), "the calls must write the bound buffers"
    ks, vs = caches[0]
    with pytest.raises(ArexportError, match="writes its cache in place"):
        head.step(hidden[:1], tokens[:1], positions[:1], write[:1], mask[:1], [k[:, :, ::2] for k in ks], vs)


def test_head_threads_follow_the_width_rule_or_the_option(head_dir):
    """The exported head's ORT session: 1 intra-op thread by default for a head narrower than SMALL_HEAD_WIDTH (the
    demo's 96), ORT's default (None) for a wider one, `head_threads` when given (a separate cached head; the session
    really has it); refused in one line: a count out of range, head_threads for a head that runs in PyTorch, and a
    served request naming it."""
    import torch

    from arexport.errors import ArexportError
    from arexport.runtime.backends.ort.head import SMALL_HEAD_WIDTH, default_head_threads
    from arexport.runtime.generator import Generator
    from arexport.runtime.methods.eagle import EagleOptions, load_head
    from arexport.runtime.verifiers import request_safe_options

    assert default_head_threads(96) == 1 and default_head_threads(SMALL_HEAD_WIDTH - 1) == 1
    assert default_head_threads(SMALL_HEAD_WIDTH) is None and default_head_threads(2048) is None
    spec, cpu = Generator.load("demo").spec, torch.device("cpu")
    one = load_head(EagleOptions(draft_head=str(head_dir)), spec, cpu)
    two = load_head(EagleOptions(draft_head=str(head_dir), head_threads=2), spec, cpu)
    assert two is not one and (one.threads, two.threads) == (1, 2)
    assert one.session.get_session_options().intra_op_num_threads == 1
    assert two.session.get_session_options().intra_op_num_threads == 2
    with pytest.raises(ArexportError, match="head-threads must be in"):
        EagleOptions(draft_head=str(head_dir), head_threads=0).validate()
    with pytest.raises(ArexportError, match="runs in PyTorch"):
        load_head(EagleOptions(draft_head="demo-eagle", head_threads=1), spec, cpu)
    with pytest.raises(ArexportError, match="head_threads"):
        request_safe_options({"head_threads": 1})


def test_head_graph_is_fused_and_the_fused_step_equals_the_plain_one(head_dir):
    """The exported head traces under fused_export: per layer one q/k/v MatMul (and Split), one gate/up MatMul,
    RotaryEmbedding on q and k, RMSNormalization for each norm, and no decomposed norm (Pow, ReduceMean, Sqrt); its
    call is then ~50 nodes where the plain trace took ~80 (a small head's call costs per node). The fused step run
    eagerly (the custom ops' reference arithmetic) equals the plain step on a tree-shaped mask, a cache already
    holding pairs and a condition position (-1). Control: what a fused MLP reading gate and up in the wrong order
    computes (the plain step with the two weights exchanged) is rejected."""
    from collections import Counter

    import onnx
    import torch

    from arexport.models.eagle import EagleConfig, EagleHead
    from arexport.models.fused import fused_export

    g = onnx.load(str(head_dir / "draft_head.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in g.graph.node)
    assert ops["RotaryEmbedding"] == 2 and ops["RMSNormalization"] == 1 and ops["Attention"] == 1, ops
    assert ops["MatMul"] == 6, ops  # fc, q/k/v, o, gate/up, down, lm_head
    assert not {"Pow", "ReduceMean", "Sqrt", "Reciprocal"} & set(ops), ops
    assert len(g.graph.node) <= 56, len(g.graph.node)

    cfg = EagleConfig(dim=48, n_head=4, n_kv_head=2, ffn_hidden=80, vocab_size=11, grid_size=4, n_layer=2)
    head = EagleHead(cfg).init_random(5, std=0.2).eval()
    with torch.no_grad():
        for layer in head.layers:  # norms away from 1 so that a wrong norm shows
            for n in ("input_layernorm", "post_attention_layernorm"):
                if hasattr(layer, n):
                    getattr(layer, n).weight.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(1)
    b, q, slots = 3, 4, 12
    hidden = torch.randn(b, q, 48, generator=gen)
    tokens = torch.randint(0, 11, (b, q), generator=gen)
    positions = torch.tensor([[3, 4, 4, 5], [-1, 0, 1, 1], [14, 15, 16, 17]])  # a condition row; past the grid
    write = torch.tensor([2, 0, 5])
    s = torch.arange(slots)
    mask = (s[None, None, :] < write[:, None, None]).expand(b, q, slots).clone()
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    for i in range(b):
        mask[i, :, write[i]:write[i] + q] = tree
    mask = mask[:, None]
    past_k, past_v = head.allocate(b, slots)
    for t in past_k + past_v:
        t.copy_(torch.randn(t.shape, generator=gen))

    def run(fused_on):
        ks, vs = [t.clone() for t in past_k], [t.clone() for t in past_v]
        with torch.no_grad(), fused_export(fused_on):
            out = head.step(hidden, tokens, positions, write, mask, ks, vs)
        return out[0], out[1], ks + vs

    ref_logits, ref_h, ref_cache = run(False)
    logits, h, cache = run(True)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-5)
    for a, r in zip(cache, ref_cache):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    mlp = head.layers[1].mlp
    with torch.no_grad():
        gate = mlp.gate_proj.weight.clone()
        mlp.gate_proj.weight.copy_(mlp.up_proj.weight)
        mlp.up_proj.weight.copy_(gate)
    bad_logits, _, _ = run(False)
    assert (bad_logits - ref_logits).abs().max() > 1e-2
