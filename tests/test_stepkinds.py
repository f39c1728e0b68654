"""Step kinds as declarations (format/stepkinds.py): the decode-with-hidden-states kind added for real,
exported for LlamaGen and verified against torch on ORT by `arexport verify`; TensorRT profiles as
declared; and the seam itself (no runner, exporter, verify or calibration code names a kind)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from arexport.errors import ArexportError
from arexport.format.profiles import step_profiles

PACKAGE = Path(__file__).resolve().parent.parent / "arexport"
TINY = {"n_layer": 2, "dim": 64, "n_head": 4, "grid_size": 4, "multiple_of": 32}


@pytest.fixture(scope="module")
def hidden_engine(tmp_path_factory):
    """A tiny c2i LlamaGen engine built through the CLI with the token_hidden step besides its own."""
    from click.testing import CliRunner

    from arexport.cli import cli

    out = tmp_path_factory.mktemp("engines") / "hidden"
    r = CliRunner().invoke(cli, ["build", "llamagen-c2i-B", "--random-init", "--init-seed", "7", "--model-config",
                                 ",".join(f"{k}={v}" for k, v in TINY.items()), "--batch-sizes", "1,2,4", "--verify-len", "4",
                                 "--no-images", "--step", "token_hidden", "--step", "tree_verify", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_token_hidden_is_built_and_verified_against_torch_on_ort(hidden_engine, tmp_path):
    from click.testing import CliRunner

    from arexport.cli import cli

    m = json.loads((hidden_engine / "manifest.json").read_text())
    assert m["graphs"]["step_hidden"]["step"] == "token_hidden"
    assert [o["name"] for o in m["graphs"]["step_hidden"]["outputs"]][:2] == ["logits", "hidden"]
    out = tmp_path / "verify.json"
    r = CliRunner().invoke(cli, ["verify", str(hidden_engine), "--backend", "ort", "--images", "0", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["rows"]
    hidden = [row for row in rows if row["output"] == "hidden"]
    assert {row["case"] for row in hidden} >= {"decode q=1 (token_hidden)", "verify q=4 (token_hidden)"}
    assert all(row["passed"] and row["max_abs"] < 1e-4 for row in hidden)
    assert any(row["case"] == "prefill q=1" for row in rows)  # the family's own kinds are still covered


def test_hidden_is_the_output_heads_input_and_verify_rejects_a_wrong_one(hidden_engine, monkeypatch):
    from arexport.runtime.backends import open_directory
    from arexport.runtime.loading import open_engine
    from arexport.verify import verify_engine

    eng = open_engine(str(hidden_engine), "ort")
    ref = open_directory("torch", eng.directory, eng.manifest)
    cache = eng.allocate(2)
    eng.family.prefill(eng, cache, eng.family.conditions(eng.spec, classes=[1, 2]))
    w = cache.length.clone()
    toks, pos = torch.tensor([[5, 9, 11], [3, 4, 2]]), torch.arange(3).expand(2, 3)
    out = eng.run("token_hidden", cache, tokens=toks, positions=pos, write_index=w, attn_mask=cache.causal_mask(w, 3))
    assert out["hidden"].shape == (2, 3, eng.spec.dim) and eng.calls["verify"] == 1
    head = ref.model.output(out["hidden"]).float()  # logits are the head applied to the hidden state
    assert torch.allclose(head, out["logits"], atol=1e-4)
    # negative control: a reference whose hidden state is off by 1e-3 fails verify on the hidden rows only
    step_hidden = ref.model.step_hidden

    def perturbed(*a, **k):
        logits, hidden, keys, values = step_hidden(*a, **k)
        return logits, hidden + 1e-3, keys, values

    monkeypatch.setattr(ref.model, "step_hidden", perturbed)
    rep = verify_engine(eng, ref, "fp32", batch=2, verify_len=4, full_image=False)
    failed = {r["output"] for r in rep.rows if not r["passed"]}
    assert not rep.passed and failed == {"hidden"}


def test_engines_refuse_step_kinds_they_were_not_built_with(demo_engine):
    from arexport.runtime.loading import open_engine

    eng = open_engine(str(demo_engine), "ort")
    assert eng.step_kinds() == ("token",)
    cache = eng.allocate(1)
    with pytest.raises(ArexportError, match="without a token_hidden step .*--method ar"):
        eng.run("token_hidden", cache, tokens=torch.zeros(1, 1), positions=torch.zeros(1, 1), write_index=torch.zeros(1),
                attn_mask=cache.causal_mask(torch.zeros(1, dtype=torch.long), 1))
    with pytest.raises(ArexportError, match="the token step takes tokens, positions, write_index, attn_mask; missing positions"):
        eng.run("token", cache, tokens=torch.zeros(1, 1), write_index=torch.zeros(1), attn_mask=torch.ones(1, 1, 1, cache.s_max))
    with pytest.raises(ArexportError, match="unknown step kind 'hidden'"):
        eng.run("hidden", cache)


def test_build_refuses_a_kind_the_model_does_not_implement(tmp_path):
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.models.registry import load_model

    with pytest.raises(ArexportError, match="demo-arpg has no token_hidden step"):
        build_engine(load_model("demo-arpg"), tmp_path / "x", BuildOptions(steps=("token_hidden",)))
    with pytest.raises(ArexportError, match="unknown step kind 'nope'"):
        BuildOptions(steps=("nope",)).validate()
    assert not (tmp_path / "x").exists()


def test_trt_profiles_are_the_declared_ranges():
    top = [1, 2, 4]
    assert step_profiles(top, 16, "token") == [{"kind": "decode", "batch": [1, 4, 4], "q": [1, 1, 1]},
                                               {"kind": "verify", "batch": [1, 4, 4], "q": [2, 16, 16]}]
    assert step_profiles(top, 1, "token") == [{"kind": "decode", "batch": [1, 4, 4], "q": [1, 1, 1]}]  # no empty verify
    assert step_profiles(top, 64, "multi_query") == [{"kind": "multi_query", "batch": [1, 4, 4], "q": [1, 8, 64], "m": [1, 8, 64]}]
    scale = step_profiles(top, 30, "scale", (1, 4, 9, 16, 36))
    assert [p["q"] for p in scale] == [[1, 1, 1], [4, 4, 4], [9, 9, 9], [16, 16, 16], [1, 36, 30]]
    assert step_profiles(top, 8, "caption_prefill") == [{"kind": "prefill", "batch": [1, 4, 4], "q": [0, 0, 0]}]


def test_only_the_declaration_and_the_models_name_a_step_kind():
    """The seam: runners, exporter, verify and calibration read declarations. The kind added for real
    (token_hidden / step_hidden) is named in two package files: its declaration and the model's forward."""
    hits = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                  if re.search(r"token_hidden|step_hidden", p.read_text()) and p.name != "cli.py")
    assert hits == ["format/stepkinds.py", "models/llamagen.py"], hits
    readers = ["runtime/backends/torch/runner.py", "runtime/backends/ort/runner.py", "runtime/backends/trt/runner.py",
               "exporter/export.py", "exporter/graphs.py", "exporter/build.py", "exporter/trt_build.py", "format/profiles.py",
               "calibration/capture.py", "runtime/engine.py"]
    for f in readers:
        text = (PACKAGE / f).read_text()
        assert not re.search(r"""["'](multi_query|scale|decode|verify)["']\s*(in|==|not in)\b|\b(in|==)\s*["'](multi_query|scale)["']""",
                             text), f


def test_backend_loaders_never_import_their_runners(tmp_path):
    """The loader <-> runner circles are gone and a contract keeps them gone: lint-imports fails on a
    copy of the tree whose ORT loader imports its runner again (as open_directory used to, deferred)."""
    import os
    import shutil
    import subprocess

    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    root = PACKAGE.parent
    copy = tmp_path / "tree"
    shutil.copytree(PACKAGE, copy / "arexport", ignore=shutil.ignore_patterns("weights", "__pycache__"))
    shutil.copy(root / "pyproject.toml", copy / "pyproject.toml")
    loader = copy / "arexport" / "runtime" / "backends" / "ort" / "loader.py"
    loader.write_text(loader.read_text() + "\n\ndef _engine():\n    from arexport.runtime.backends.ort.runner import OrtEngine  # noqa\n")
    bad = subprocess.run([exe], cwd=copy, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(copy)})
    assert bad.returncode != 0 and "no loader <-> runner circles) BROKEN" in " ".join(bad.stdout.split())


def test_the_largest_query_length_is_one_number(hidden_engine):
    """--verify-len, profiles.verify_len, every step graph's q_range and StepEngine.max_q are one number:
    a manifest where a step graph disagrees is refused, naming the graph."""
    from arexport.errors import ManifestError
    from arexport.format.manifest import Manifest
    from arexport.runtime.loading import open_engine

    m = json.loads((hidden_engine / "manifest.json").read_text())
    assert Manifest.from_json(m).max_q == 4 == open_engine(str(hidden_engine), "ort").max_q
    m["graphs"]["step_hidden"]["q_range"] = [1, 3]
    with pytest.raises(ManifestError, match="graph step_hidden serves queries up to 3, the profiles say 4"):
        Manifest.from_json(m)


def test_version_2_directories_are_read_with_their_step_kinds_inferred(hidden_engine):
    from arexport.errors import ManifestError
    from arexport.format.manifest import Manifest

    m = json.loads((hidden_engine / "manifest.json").read_text())
    assert m["format_version"] == 3
    m["format_version"] = 2
    for g in m["graphs"].values():
        g.pop("step", None)
    kinds = {name: k.name for name, k in Manifest.from_json(m).step_graphs().items()}
    assert kinds == {"step": "token", "step_hidden": "token_hidden", "step_tree": "tree_verify"}
    m["graphs"]["step"]["kinds"] = {"scale": 4}  # a VAR step graph of version 2
    assert Manifest.from_json(m).step_graphs()["step"].name == "scale"
    m["format_version"] = 1
    with pytest.raises(ManifestError, match="format version 1 was written by an older arexport .* rebuild"):
        Manifest.from_json(m)


# -- tree_verify (EAGLE draft trees, issue 30) ---------------------------------------------------------------
def test_tree_verify_is_built_run_with_a_tree_mask_on_ort_and_verified(hidden_engine, tmp_path):
    """The tree_verify kind exported for LlamaGen (`--step tree_verify`, built in the fixture's engine):
    `arexport verify` checks it on ORT through its declaration, and a real tree mask (per-node positions,
    ancestors only) gives ORT's logits and hidden states equal to torch's, which differ from a causal
    block's (the mask is really applied)."""
    from click.testing import CliRunner

    from arexport.cli import cli
    from arexport.runtime.backends import open_directory
    from arexport.runtime.loading import open_engine
    from arexport.runtime.tree import ancestor_mask

    out = hidden_engine
    m = json.loads((out / "manifest.json").read_text())
    assert m["graphs"]["step_tree"]["step"] == "tree_verify"
    rep = tmp_path / "verify.json"
    r = CliRunner().invoke(cli, ["verify", str(out), "--backend", "ort", "--images", "0", "--json", str(rep)])
    assert r.exit_code == 0, r.output
    rows = [row for row in json.loads(rep.read_text())["rows"] if "tree_verify" in row["case"]]
    assert {row["output"] for row in rows} >= {"logits", "hidden"} and all(row["passed"] for row in rows)

    eng = open_engine(str(out), "ort")
    ref = open_directory("torch", eng.directory, eng.manifest)
    parent = torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, 2]])  # a bushy tree and a chain (the fixture's block is 4)
    depth = torch.tensor([[0, 1, 1, 2], [0, 1, 2, 3]])
    toks = torch.tensor([[5, 9, 11, 3], [3, 4, 2, 8]])
    results = []
    for e in (eng, ref):
        cache = e.allocate(2, lookahead=4)
        e.family.prefill(e, cache, e.family.conditions(e.spec, classes=[1, 2]))
        w = cache.length.clone()
        mask = cache.causal_mask(w, 4).clone()
        slots = (w[:, None] + torch.arange(4)[None, :])
        mask[:, 0].scatter_(2, slots[:, None, :].expand(-1, 4, -1), ancestor_mask(parent))
        results.append(e.run("tree_verify", cache, tokens=toks, positions=depth, write_index=w, attn_mask=mask))
        if e is ref:
            causal = e.run("tree_verify", cache, tokens=toks, positions=depth, write_index=w, attn_mask=cache.causal_mask(w, 4))
    assert eng.calls["tree"] == 1
    for k in ("logits", "hidden"):
        assert torch.allclose(results[0][k].float(), results[1][k].float(), atol=1e-4), k
    assert torch.allclose(results[1]["logits"][1], causal["logits"][1], atol=1e-5)  # a chain is the causal block
    assert not torch.allclose(results[1]["logits"][0], causal["logits"][0], atol=1e-3)  # a tree is not


def test_eagle_and_vvs_heads_run_on_an_ort_engine(hidden_engine, tmp_path):
    """eagle and vvs on the eagle drafter over an ORT engine (a random head beside it in torch): the c2i prefill
    through the tree graph gives the prefill's logits, so the first round drafts; greedy eagle and vvs with
    skipping off equal greedy ar token for token (trees of 3 and 1 nodes fit the fixture's block of 4)."""
    import numpy as np

    from arexport.models.eagle import EagleConfig, EagleHead, save_eagle_head
    from arexport.runtime.generator import Generator
    from arexport.runtime.loading import open_engine
    from arexport.runtime.sampling import SamplingParams

    eng = open_engine(str(hidden_engine), "ort")
    spec = eng.spec
    head = EagleHead(EagleConfig(dim=spec.dim, n_head=4, n_kv_head=4, ffn_hidden=64, vocab_size=spec.vocab_size,
                                 grid_size=spec.grid_size)).init_random(3, std=0.3)
    path = tmp_path / "head.safetensors"
    save_eagle_head(head, path)
    conds = eng.family.conditions(spec, classes=[1, 2])
    c1, c2 = eng.allocate(2), eng.allocate(2)
    plain = eng.family.prefill(eng, c1, conds)
    logits, hidden = eng.family.prefill_hidden(eng, c2, conds)
    assert torch.allclose(plain, logits, atol=1e-5) and hidden.shape == (2, 1, spec.dim)  # one condition position (c2i)
    gen = Generator(eng)
    greedy = SamplingParams(temperature=0.0, cfg_scale=1.0)
    kw = dict(classes=[1, 2, 3], sampling=greedy, seed=0, images=False, timings=False)
    ar = gen.generate(method="ar", **kw)
    eg = gen.generate(method="eagle", method_options={"draft_head": str(path), "tree": "static", "choices": "0;1;0,0"}, **kw)
    vv = gen.generate(method="vvs", method_options={"draft_head": str(path), "tree": "static", "choices": "0", "policy": "none",
                                                     "delta": 0.0}, **kw)
    assert np.array_equal(ar.tokens, eg.tokens) and np.array_equal(ar.tokens, vv.tokens)
    assert eg.stats["draft_forwards_per_image"] > 0 and eg.stats["target_forwards_per_image"] <= spec.n_tokens


def test_tree_verify_profiles_and_seam():
    """Its TensorRT profile is the declared one; only its declaration, the model and the method that runs
    it name the kind (no runner, exporter or verify branch)."""
    assert step_profiles([1, 2, 4], 16, "tree_verify") == [{"kind": "tree", "batch": [1, 4, 4], "q": [1, 16, 16]}]
    hits = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                  if re.search(r"tree_verify|step_tree", p.read_text()) and p.name != "cli.py")
    assert hits == ["format/stepkinds.py", "models/llamagen.py", "runtime/methods/eagle.py"], hits


def test_draft_head_kind_exports_and_runs_on_ort_like_torch(tmp_path):
    """The draft_head kind exported from an EAGLE head through its declaration (the exporter's generic
    export_step_kind): ONNX Runtime's logits, hidden states and in-place cache equal torch's under a tree mask."""
    import numpy as np
    import onnxruntime as ort

    from arexport.exporter.export import WeightStore, export_step_kind
    from arexport.format.stepkinds import get_step_kind
    from arexport.models.eagle import EagleConfig, EagleHead

    head = EagleHead(EagleConfig(dim=32, n_head=4, n_kv_head=2, ffn_hidden=48, vocab_size=19, grid_size=4)).init_random(2, 0.2)
    kind, slots = get_step_kind("draft_head"), 24
    store = WeightStore(tmp_path)
    g = export_step_kind(head, kind, head.spec(slots), tmp_path, store, torch.float32, max_q=6, max_batch=2)
    store.close()
    gen = torch.Generator().manual_seed(0)
    feeds = {"hidden": torch.randn(2, 5, 32, generator=gen), "tokens": torch.randint(0, 19, (2, 5), generator=gen),
             "positions": torch.tensor([[3, 4, 4, 5, 5], [7, 8, 9, 10, 11]]), "write_index": torch.tensor([3, 7])}
    mask = torch.zeros(2, 1, 5, slots, dtype=torch.bool)
    mask[0, 0, :, :3] = True
    anc = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]]).bool()
    mask[0, 0, :, 3:8] = anc
    mask[1, 0] = (torch.arange(slots)[None, :] <= 7 + torch.arange(5)[:, None])
    feeds["attn_mask"] = mask
    past = [torch.randn(2, 2, slots, 8, generator=gen) for _ in range(2)]
    keys, values = [past[0].clone()], [past[1].clone()]
    with torch.no_grad():
        logits, hid, keys, values = head.step(*feeds.values(), keys, values)
    sess = ort.InferenceSession(str(tmp_path / g.file), providers=["CPUExecutionProvider"])
    res = sess.run(None, {**{k: v.numpy() for k, v in feeds.items()}, "past_key_0": past[0].numpy(), "past_value_0": past[1].numpy()})
    names = [o.name for o in sess.get_outputs()]
    assert names[:2] == ["logits", "hidden_out"]
    assert np.allclose(res[0], logits.numpy(), atol=1e-5) and np.allclose(res[1], hid.numpy(), atol=1e-5)
    assert np.allclose(res[names.index("present_key_0")], keys[0].numpy(), atol=1e-5)
    assert step_profiles([1, 2], 8, "draft_head") == [{"kind": "draft", "batch": [1, 2, 2], "q": [1, 8, 8]}]
