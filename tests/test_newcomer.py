"""A newcomer's path (issue 36): the README's first-ten-minutes blocks run as written, --help comes
from the registries without importing torch, engine directories run on ONNX Runtime by default,
summary lines and tables say what they measured, and a quantized engine is verified against its
own gates."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from arexport.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    env.pop("AREXPORT_TOKEN", None)
    return env


# -- --help: fast, complete, generated from the registries --------------------------------------------

def test_cli_catalog_matches_the_registries(monkeypatch):
    from arexport.cli import CATALOG_FILE, live_catalog
    from arexport.runtime.methods import METHODS, ar

    live = json.loads(json.dumps(live_catalog()))
    assert json.loads(CATALOG_FILE.read_text()) == live, "stale arexport/cli_catalog.json: run scripts/write_cli_catalog.py"
    # negative control: a method registered after the file was written makes the comparison fail
    monkeypatch.setitem(METHODS, "zz-new", type("ZZ", (ar.AR,), {"name": "zz-new"}))
    assert json.loads(json.dumps(live_catalog())) != live


def test_help_lists_every_method_and_model_without_importing_torch():
    from arexport.models.registry import known_models
    from arexport.runtime.methods import METHODS

    code = ("import sys\nfrom arexport.cli import cli\n"
            "try:\n    cli.main(['generate', '--help'], prog_name='arexport')\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(COLUMNS="200"),
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("TORCH False")
    text = re.sub(r"-\n\s+", "-", out.stdout)  # help wraps after hyphens (GPT-/SIZE): names are whole again
    method_help = " ".join(re.search(r"--method TEXT\s+(.*?)\n\s+--", text, re.S).group(1).split())
    for name in METHODS:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", method_help), name
    for name in known_models():
        assert name in text, name
    assert "GPT-SIZE" in text and "t2i-SIZE" in text
    assert "(default None)" not in text
    for opt in re.split(r"\n\s+(?=--)", text):  # one default per option
        assert len(re.findall(r"Default: |\(default \w|\[default: ", " ".join(opt.split()))) <= 1, opt
    # per-method defaults where they differ (lantern's delta is not vvs's)
    flat = " ".join(text.split())
    assert re.search(r"--lantern-delta FLOAT .*?\(default 0\.1 \(lantern\), 0\.2 \(vvs\)\)", flat)


def test_unknown_model_error_names_the_readme_aliases():
    res = CliRunner().invoke(cli, ["generate", "--model", "GPT-Q", "--classes", "1"])
    assert res.exit_code == 1
    assert "GPT-SIZE" in res.output and "t2i-SIZE" in res.output and "XL" in res.output


# -- generate: default backend, summary lines, --draft, grid ------------------------------------------

def test_engine_dir_runs_on_ort_unless_told_and_summary_names_it(demo_engine, tmp_path):
    for extra, backend in (([], "ort"), (["--backend", "torch"], "torch")):
        stats = tmp_path / f"{backend}.json"
        res = CliRunner().invoke(cli, ["generate", str(demo_engine), "--classes", "1", "--stats-json", str(stats),
                                       "--no-progress", *extra])
        assert res.exit_code == 0, res.output
        s = json.loads(stats.read_text())
        assert (s["backend"], s["precision"], s["device"]) == (backend, "fp32", "cpu")
        assert f"{backend} fp32 cpu" in res.output and f"stats {stats}" in res.output


@pytest.mark.parametrize("args, message", [
    (["--draft", "demo-draft"], "add --method sd"),
    (["--draft", "demo-draft", "--method", "sjd"], "method sjd does not use --draft"),
    (["--draft", "demo-draft", "--method", "lantern", "--drafter", "sjd"], "method lantern does not use --draft"),
    (["--refiner", "demo-var-small"], "needs a method that uses it"),
])
def test_a_second_engine_the_method_does_not_use_is_an_error(args, message, tmp_path):
    res = CliRunner().invoke(cli, ["generate", "--model", "demo", "--classes", "1", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 1 and message in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_draft_with_sd_still_runs(tmp_path):
    res = CliRunner().invoke(cli, ["generate", "--model", "demo", "--classes", "1", "--draft", "demo-draft", "--method",
                                   "sd", "--gamma", "2", "--save-tokens", str(tmp_path / "t.npy"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "draft forwards" in res.output and "mean accepted length" in res.output


def _stats(**kw) -> dict:
    base = dict(images=2, model="demo", backend="ort", precision="fp32", device="cpu", seconds=1.0, seconds_per_image=0.5,
                tokens_per_image=64, target_forwards_per_image=64.0, draft_forwards=0)
    return dict(base, **kw)


def test_summary_lines_name_what_each_method_costs():
    from arexport.cli import summary_line

    grid = summary_line(_stats(candidate_forwards_per_image=256.0, mean_accepted_length=1.0), "gridar")
    assert "256.0 candidate forwards per image" in grid and "64.0 target forwards" not in grid
    var = summary_line(_stats(tokens_per_image=85, target_forwards_per_image=4.0, mean_accepted_length=21.25), "var")
    assert "accepted" not in var and "21.25 tokens per forward" in var
    code = summary_line(_stats(tokens_per_image=85, target_forwards_per_image=2.0, drafter_forwards_per_image=2.0,
                               refiner_forwards_per_image=2.0, mean_accepted_length=21.25), "code")
    assert "2.0 drafter + 2.0 refiner" in code and "21.25 tokens per forward" in code and "accepted" not in code
    sjd = summary_line(_stats(target_forwards_per_image=20.0, mean_accepted_length=3.2), "sjd")
    assert "mean accepted length 3.20" in sjd and "tokens per forward" not in sjd
    assert "(demo, sjd, ort fp32 cpu)" in sjd


def test_grid_columns_and_labels():
    from arexport.cli import image_grid

    imgs = np.zeros((7, 16, 16, 3), dtype=np.uint8)
    plain = image_grid(imgs, cols=3)
    assert plain.shape == (3 * 20 - 4, 3 * 20 - 4, 3)
    labelled = image_grid(imgs, cols=3, labels=[str(i) for i in range(7)])
    assert labelled.shape == (3 * 32 - 4, 3 * 20 - 4, 3)
    assert plain.max() == 96 and labelled[16:28, :16].max() > 200  # light label text under the image, on grey
    with pytest.raises(Exception, match="2 grid labels for 7 images"):
        image_grid(imgs, labels=["a", "b"])


def test_grid_cli_says_where_it_went(tmp_path):
    g = tmp_path / "g.png"
    res = CliRunner().invoke(cli, ["generate", "--model", "demo", "--classes", "0,1,2", "--grid", str(g), "--grid-cols", "2",
                                   "--grid-labels", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"-> grid {g}" in res.output
    from PIL import Image

    assert Image.open(g).size == (2 * 128 + 4, 2 * (128 + 12) + 4)


# -- profile: table and plot ----------------------------------------------------------------------------

def _result(label: str, ms: float):
    from arexport.profiling.profiler import ProfileResult

    steps = {"prefill": dict(count=1, mean_ms=ms, p50_ms=ms, p90_ms=ms, p99_ms=ms),
             "verify": dict(count=17, mean_ms=ms, p50_ms=ms * 1.234, p90_ms=ms * 12.345, p99_ms=ms * 123.45),
             "vq_decode": dict(count=1, mean_ms=500.0, p50_ms=500.0, p90_ms=500.0, p99_ms=500.0)}
    trace = [{"kind": "prefill", "q": 1, "ms": ms}] + [{"kind": "verify", "q": 16, "ms": ms}] * 5 + \
            [{"kind": "vq_decode", "q": 64, "ms": 500.0}]
    return ProfileResult(label=label, backend=label.split(":")[0], method="sjd", device="cpu", images=1, repeats=1,
                         steps=steps, image_ms={"p50": 123.456, "p90": 130.0, "p99": 140.0}, images_per_s=8.1,
                         tokens_per_s=518.0, target_forwards_per_image=17.0, mean_accepted_length=3.9,
                         peak_memory_bytes=300 * 2**20, peak_memory_kind="rss", trace=trace)


def test_profile_table_fits_80_columns_with_distinct_labels():
    import io

    from rich.console import Console

    from arexport.profiling.report import print_table

    labels = ["torch:ar", "ort:sjd", "ort:sjd[window=16]", "ort:sjd[window=16]", "ort:sjd[window=4,init=random]",
              "ort:sd[gamma=4]", "ort:lantern", "ort:vvs"]
    buf = io.StringIO()
    print_table([_result(lb, 1.0 + i) for i, lb in enumerate(labels)], Console(file=buf, width=80), compare=True)
    text = buf.getvalue()
    assert max(len(ln) for ln in text.splitlines()) <= 80
    assert "…" not in text
    for i, lb in enumerate(labels):  # each config once in the legend, duplicates numbered, markup kept
        want = lb + ("#2" if i == 3 else "")
        assert f"[{i + 1}] = {want}\n" in text, want
    for row in ("verify p99 ms", "x ms/image vs [1]"):
        assert text.count(row) == 2  # two tables side by side would not fit: the configs are split
    # every number whole in its cell: the verify p99 of config 8 is 8 * 123.45
    assert re.search(r"│\s+987\.60 │", text)


def test_profile_plot_keeps_image_decoder_calls_out_of_the_step_series(tmp_path, monkeypatch):
    import matplotlib.axes

    from arexport.profiling.report import plot

    seen = []
    orig = matplotlib.axes.Axes.plot

    def spy(self, *args, **kw):
        if kw.get("marker") == ".":  # the per-step series (the CDF panel's step() calls plot() too)
            seen.append(list(args[1]))
        return orig(self, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    plot([_result("ort:sjd", 1.0), _result("ort:sjd", 2.0)], tmp_path / "p.png")
    assert len(seen) == 2 and all(len(ys) == 6 and 500.0 not in ys for ys in seen)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# -- quantized engines: verify against their own gates, inspect shows them ------------------------------

@pytest.fixture(scope="module")
def int8_engine(demo_int8):
    """The session's demo engine and its int8 calibration (conftest.demo_int8: built and quantized once)."""
    src, out, said, _ = demo_int8
    return src, out, said


def test_calibrate_says_why_it_has_fewer_samples_and_stores_relative_paths(int8_engine):
    src, out, said = int8_engine
    from arexport.format.manifest import read_manifest

    assert any("not --samples 40" in m and "--every" in m for m in said), said
    assert any("held out for the gates" in m for m in said), said
    q = read_manifest(out).quantization
    for p in (q["source_engine"], q["calibration"]["path"]):
        assert not os.path.isabs(p)
    assert (out / q["source_engine"]).resolve() == src.resolve()
    assert (out / q["calibration"]["path"] / "manifest.json").exists()


def test_verify_checks_a_quantized_engine_against_its_own_gates(int8_engine):
    from arexport.format.manifest import read_manifest
    from arexport.runtime.loading import open_engine
    from arexport.verify import verify_engine, verify_quantized

    _, out, _ = int8_engine
    q = read_manifest(out).quantization
    engine = open_engine(str(out), backend="ort")
    ref = open_engine(str(out), backend="torch", verify_hashes=False)
    rep = verify_quantized(engine, ref, q, verify_len=4, n_images=0, demo_images=20)
    names = [g["name"] for g in rep.gates]
    assert rep.passed and len(names) == 3, rep.gates
    assert names[0].startswith("top-1 agreement") and names[1].startswith("mean KL") and "demo accuracy" in names[2]
    assert 0.9 <= rep.gates[0]["value"] <= 1.0 and 0 <= rep.gates[1]["value"] < 0.05
    # negative controls: gates tighter than the engine meets fail; fp32 tolerances fail it (the old symptom)
    strict = dict(q, gates=dict(q["gates"], thresholds={"min_agreement": 1.01, "max_kl": 0.0, "max_accuracy_drop": -1.0}))
    bad = verify_quantized(engine, ref, strict, verify_len=4, n_images=0, demo_images=20)
    assert not bad.passed and not any(g["passed"] for g in bad.gates)
    assert not verify_engine(engine, ref, "fp32", verify_len=4, full_image=False).passed


def test_inspect_shows_quantization_and_verify_refuses_fp32_tolerances(int8_engine):
    _, out, _ = int8_engine
    res = CliRunner().invoke(cli, ["inspect", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "precision fp32 + int8 quantization" in res.output
    assert "quantized int8 from ../demo" in res.output and "calibration set ../demo.calib" in res.output
    assert re.search(r"gates passed on \d+ held-out step rows: top-1 agreement [\d.]+ \(>= 0\.9\); mean KL", res.output)
    res = CliRunner().invoke(cli, ["verify", str(out), "--atol", "1e-4"])
    assert res.exit_code == 1 and "is quantized (int8)" in res.output


# -- the README's first ten minutes, as written ------------------------------------------------------

def _runnable_blocks() -> list[str]:
    return re.findall(r"^```bash runnable\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)


def test_readme_first_ten_minutes_runs_as_written(tmp_path):
    """Every ```bash runnable block of README.md, top to bottom in one shell (as pasted), in an empty
    directory, with `arexport` meaning this checkout; a failing command fails the test (set -e, pipefail)."""
    blocks = _runnable_blocks()
    assert len(blocks) >= 2
    assert any("Authorization: Bearer $AREXPORT_TOKEN" in b and "curl -sf" in b for b in blocks)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "arexport"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m arexport.cli "$@"\n')
    shim.chmod(0o755)
    with socket.socket() as s:  # a free port for the server block (it reads $PORT, default 8000)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tmp_path / "clone"
    work.mkdir()
    script = "set -e -o pipefail\n" + "\n".join(blocks)
    env = _env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", PORT=str(port), COLUMNS="100")
    log = tmp_path / "blocks.log"
    with open(log, "w") as f:  # a file, not a pipe: a server left behind by a failing block cannot hold the test
        proc = subprocess.Popen(["bash", "-c", script], cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=1500)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever the blocks left running (a server after a failure)
            except ProcessLookupError:
                pass
    output = log.read_text()
    assert rc == 0, output[-5000:]
    assert (work / "out/first.png").read_bytes()[:4] == b"\x89PNG"
    assert (work / "engines/demo/manifest.json").exists()
    stats = json.loads((work / "out/sjd.json").read_text())
    assert (stats["backend"], stats["method"], stats["images"]) == ("ort", "sjd", 4)
    assert (work / "three.png").read_bytes()[:4] == b"\x89PNG"  # an image, not a 401's JSON
    assert "PASS" in output


def test_readme_runnable_blocks_fail_loudly(tmp_path):
    """Negative control for the test above: the same harness reports a failing command in a block."""
    out = subprocess.run(["bash", "-c", "set -e -o pipefail\n" + "true\nfalse\necho never"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "never" not in out.stdout
    # and a runnable fence is recognised only with its marker
    assert all("arexport" in b for b in _runnable_blocks())
    assert not any(b.lstrip().startswith("pip install") for b in _runnable_blocks())
