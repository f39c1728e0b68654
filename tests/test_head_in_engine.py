"""A draft head built into an engine directory (`build-head HEAD --into ENGINE_DIR`): found by eagle, lantern and
vvs without --draft-head, checked by `verify ENGINE_DIR`, never replacing anything without --overwrite."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from arexport.cli import cli
from arexport.format.manifest import file_sha256

pytest.importorskip("onnxruntime")
pytest.importorskip("polygraphy")

HEAD_ARGS = ["--verify-len", "8", "--batch-sizes", "4", "--extra-slots", "24"]


@pytest.fixture(scope="module")
def with_head(demo_tree_engine, tmp_path_factory):
    """A copy of demo_tree_engine (conftest) with demo-eagle built into it; (directory, sha256 of every file before)."""
    d = tmp_path_factory.mktemp("embedded") / "eng"
    shutil.copytree(demo_tree_engine, d)
    before = {p.name: file_sha256(p) for p in d.iterdir() if p.name != "manifest.json"}
    r = CliRunner().invoke(cli, ["build-head", "demo-eagle", "--into", str(d), *HEAD_ARGS])
    assert r.exit_code == 0, r.output
    return d, before


def _run(d, method, **options):
    from arexport.runtime.generator import Generator
    from arexport.runtime.sampling import SamplingParams

    gen = Generator.load(str(d), backend="ort")
    res = gen.generate(method=method, method_options=options, classes=[1, 2], seed=3, images=False, timings=False,
                       sampling=SamplingParams(temperature=1.0, cfg_scale=1.5))
    return res.tokens, res.stats


def test_the_head_goes_into_the_manifest_and_nothing_else_changes(with_head):
    """The graph and weights sit beside the target's files under tagged names, hashed in manifest.files; every file
    the engine had before is byte-identical, and a second build-head without --overwrite is refused, writing nothing."""
    d, before = with_head
    m = json.loads((d / "manifest.json").read_text())
    head = m["draft_head"]
    assert head["graph"].startswith("draft_head-") and head["graph"] in m["files"] and head["weights"] in m["files"]
    assert head["n_tokens"] == 64 and head["config"]["hidden_size"] == 96 and head["source"] == "demo-eagle"
    assert {p.name: file_sha256(p) for p in d.iterdir() if p.name in before} == before
    manifest = (d / "manifest.json").read_bytes()
    r = CliRunner().invoke(cli, ["build-head", "demo-eagle", "--into", str(d), *HEAD_ARGS])
    assert r.exit_code != 0 and "already holds a draft head" in r.output and "--overwrite" in r.output, r.output
    assert (d / "manifest.json").read_bytes() == manifest and len(list(d.iterdir())) == len(before) + 3
    r = CliRunner().invoke(cli, ["build-head", "demo-eagle", "--into", str(d), "--out", str(d.parent / "x")])
    assert r.exit_code != 0 and "give exactly one" in r.output


def test_methods_find_the_engines_head_and_an_explicit_one_wins(with_head, tmp_path, monkeypatch):
    """eagle, lantern and vvs run on the embedded head with no --draft-head (lantern/vvs default to the eagle drafter
    then, with no draft model); the tokens equal those of the same head passed explicitly as a separate head
    directory; an explicit --draft-head is the head that runs; --drafter sd still asks for its draft model."""
    from arexport.errors import ArexportError
    from arexport.runtime.backends.ort.head import OrtDraftHead

    d, _ = with_head
    sep = tmp_path / "sep"
    r = CliRunner().invoke(cli, ["build-head", "demo-eagle", "--model", "demo", "--out", str(sep), *HEAD_ARGS])
    assert r.exit_code == 0, r.output
    opened = []
    init = OrtDraftHead.__init__
    monkeypatch.setattr(OrtDraftHead, "__init__", lambda self, directory, *a, **k: opened.append(str(directory)) or
                        init(self, directory, *a, **k))
    from arexport.runtime.methods import eagle as eagle_method

    for method in ("eagle", "lantern", "vvs"):
        opened.clear()
        eagle_method._heads.clear()  # loaded heads are reused across calls: open each afresh to see which one runs
        tokens, stats = _run(d, method)
        assert opened == [str(d)] and stats["draft_forwards_per_image"] > 0, (method, opened)
        opened.clear()
        eagle_method._heads.clear()
        explicit, _ = _run(d, method, draft_head=str(sep))
        assert opened == [str(sep)], method
        assert np.array_equal(tokens, explicit), method  # same graph, same seed: same tokens
    with pytest.raises(ArexportError, match="needs a draft model"):
        _run(d, "lantern", drafter="sd")


def test_a_head_for_another_target_is_refused_by_name(with_head, tmp_path):
    """An embedded head record naming another target (100 image tokens) is refused in one line naming both; an engine
    without a head gives eagle's "needs a draft head" error, which now names build-head --into."""
    from arexport.errors import ArexportError

    d, _ = with_head
    other = tmp_path / "other"
    shutil.copytree(d, other)
    m = json.loads((other / "manifest.json").read_text())
    m["draft_head"]["n_tokens"] = 100
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArexportError, match="built for a target of width 96, vocabulary 17 and 100 image tokens; demo has 96, 17 and 64"):
        _run(other, "eagle")
    plain = tmp_path / "plain"
    shutil.copytree(d, plain)
    m = json.loads((plain / "manifest.json").read_text())
    del m["draft_head"]
    (plain / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArexportError, match="build-head HEAD --into"):
        _run(plain, "eagle")


def test_verify_checks_the_embedded_head_and_overwrite_replaces_it(with_head, tmp_path):
    """`verify ENGINE` adds the head's rows (logits, hidden state, caches vs the PyTorch head); a head whose weights
    were scaled by 1.01 in 512 places (its manifest hash updated, so only the numbers can tell) fails on head rows
    only (negative control). --overwrite then writes a fresh head under new names and deletes the old files."""
    d, before = with_head
    eng = tmp_path / "eng"
    shutil.copytree(d, eng)
    js = tmp_path / "v.json"
    r = CliRunner().invoke(cli, ["verify", str(eng), "--images", "0", "--json", str(js)])
    assert r.exit_code == 0, r.output
    rep = json.loads(js.read_text())
    assert rep["passed"] and {"logits", "hidden_out", "present_key_0"} <= {x["output"] for x in rep["draft_head"]["rows"]}

    m = json.loads((eng / "manifest.json").read_text())
    w = eng / m["draft_head"]["weights"]
    arr = np.fromfile(w, dtype=np.float32)
    arr[len(arr) // 2: len(arr) // 2 + 512] *= 1.01
    arr.tofile(w)
    m["files"][w.name]["sha256"] = file_sha256(w)
    (eng / "manifest.json").write_text(json.dumps(m))
    r = CliRunner().invoke(cli, ["verify", str(eng), "--images", "0", "--json", str(js)])
    assert r.exit_code == 1 and "FAIL" in r.output, r.output
    rep = json.loads(js.read_text())
    assert not rep["passed"] and not rep["draft_head"]["passed"]
    assert all(x["passed"] for x in rep["rows"])  # the target's own rows still pass

    old = {m["draft_head"]["graph"], m["draft_head"]["weights"]}
    r = CliRunner().invoke(cli, ["build-head", "demo-eagle", "--into", str(eng), "--overwrite", *HEAD_ARGS])
    assert r.exit_code == 0, r.output
    new = json.loads((eng / "manifest.json").read_text())["draft_head"]
    assert not old & {new["graph"], new["weights"]} and not any((eng / n).exists() for n in old)
    assert not [p for p in eng.iterdir() if p.name.startswith(".")]  # no temp directory left
    from arexport.format.manifest import read_manifest, verify_files

    verify_files(eng, read_manifest(eng))  # the listing names exactly the new head's files, with their hashes
