"""The CLI end to end on the demo model, and one-line errors (no traceback) for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from arexport.cli import cli


def run(*args, ok=True):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


def test_generate_demo_writes_images_tokens_and_stats(tmp_path):
    out = tmp_path / "imgs"
    run("generate", "--model", "demo", "--classes", "3,1,4,1,5", "--batch-size", "2", "--out", out,
        "--save-tokens", tmp_path / "t.npy", "--stats-json", tmp_path / "s.json", "--grid", tmp_path / "g.png", "--no-progress")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["0000.png", "0001.png", "0002.png", "0003.png", "0004.png"]
    img = np.asarray(Image.open(out / "0000.png"))
    assert img.shape == (128, 128, 3)
    tok = np.load(tmp_path / "t.npy")
    assert tok.shape == (5, 64) and tok.dtype == np.int64 and tok.min() >= 0 and tok.max() <= 16
    stats = json.loads((tmp_path / "s.json").read_text())
    for key in ("images", "batches", "tokens_per_image", "target_forwards", "draft_forwards", "seconds"):
        assert key in stats, key
    assert stats["images"] == 5 and stats["batches"] == 3 and stats["tokens_per_image"] == 64
    # AR: one prefill + 63 single-token steps per batch; a batched call counts once.
    assert stats["target_forwards"] == 3 * 64 and stats["draft_forwards"] == 0
    assert Image.open(tmp_path / "g.png").size[0] > 128


def test_same_seed_same_tokens_any_batch_size(tmp_path):
    run("generate", "--model", "demo", "--classes", "7x3", "--batch-size", "3", "--save-tokens", tmp_path / "a.npy", "--seed", "11")
    run("generate", "--model", "demo", "--classes", "7x3", "--batch-size", "1", "--save-tokens", tmp_path / "b.npy", "--seed", "11")
    run("generate", "--model", "demo", "--classes", "7x3", "--batch-size", "1", "--save-tokens", tmp_path / "c.npy", "--seed", "12")
    a, b, c = (np.load(tmp_path / f"{x}.npy") for x in "abc")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_build_inspect_verify_generate_on_engine(tmp_path):
    eng = tmp_path / "eng"
    run("build", "demo", "--out", eng, "--batch-sizes", "1,2,4", "--verify-len", "8")
    res = run("inspect", eng)
    assert "TensorScatter" in res.output and "demo" in res.output and "tokens" in res.output
    res = run("verify", eng, "--images", "2", "--json", tmp_path / "v.json")
    assert "PASS" in res.output
    rep = json.loads((tmp_path / "v.json").read_text())
    assert rep["passed"] and rep["token_agreement"] == 1.0
    run("generate", eng, "--backend", "ort", "--classes", "2,5", "--save-tokens", tmp_path / "ort.npy", "--out", tmp_path / "o")
    run("generate", "--model", "demo", "--classes", "2,5", "--save-tokens", tmp_path / "torch.npy")
    assert np.array_equal(np.load(tmp_path / "ort.npy"), np.load(tmp_path / "torch.npy"))
    assert (tmp_path / "o" / "0001.png").exists()
    # decode saved tokens through the engine's image graph
    run("decode", eng, "--backend", "ort", "--tokens", tmp_path / "ort.npy", "--out", tmp_path / "d")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "d" / "0000.png")), np.asarray(Image.open(tmp_path / "o" / "0000.png")))


def test_generate_random_init_llamagen_tokens_only(tmp_path):
    run("generate", "--model", "GPT-B", "--random-init", "--model-config", "n_layer=1,grid_size=4", "--classes", "207,360",
        "--save-tokens", tmp_path / "t.npy", "--top-k", "50")
    tok = np.load(tmp_path / "t.npy")
    assert tok.shape == (2, 16) and tok.max() < 16384


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "nope", "--classes", "1", "--save-tokens", "x.npy"], "unknown model name 'nope'"),
    (["generate", "--model", "demo", "--classes", "10", "--save-tokens", "x.npy"], "class id 10 out of range [0, 9] for model demo"),
    (["generate", "--model", "demo", "--classes", "a", "--save-tokens", "x.npy"], "bad class id: 'a' is not an integer"),
    (["generate", "--model", "demo", "--classes", "1", "--method", "magic", "--save-tokens", "x.npy"], "unknown decoding method 'magic'"),
    (["generate", "--model", "demo", "--classes", "1", "--top-p", "0", "--save-tokens", "x.npy"], "top-p must be in (0, 1]"),
    (["generate", "--model", "GPT-B", "--classes", "1", "--save-tokens", "x.npy"], "needs weights: pass --checkpoint PATH or --random-init"),
    (["generate", "no/such/engine", "--backend", "ort", "--classes", "1", "--save-tokens", "x.npy"], "engine directory not found"),
    (["build", "demo", "--out", "e", "--batch-sizes", "x"], "bad --batch-sizes"),
    (["build", "demo", "--out", "e", "--backend", "trt"], "TensorRT"),
    (["inspect", "missing_dir"], "engine directory not found"),
    (["serve", "--model", "demo", "--host", "0.0.0.0"], "refusing to listen on 0.0.0.0 unauthenticated"),
    (["serve", "--model", "demo", "--port", "99999"], "--port must be in 1..65535"),
    (["generate", "--model", "demo", "--classes", "1", "--method", "sjd", "--window", "1", "--save-tokens", "x.npy"],
     "sjd window must be >= 2"),
    (["generate", "--model", "demo", "--classes", "1", "--method", "sd", "--window", "4", "--draft", "demo-draft",
      "--save-tokens", "x.npy"], "method sd has no option 'window'"),
    (["generate", "--model", "demo", "--classes", "1", "--draft", "demo-arpg", "--method", "sd", "--save-tokens", "x.npy"],
     "draft demo-arpg belongs to the arpg family"),
    (["generate", "--model", "demo", "--classes", "1", "--temperature", "nan", "--save-tokens", "x.npy"],
     "temperature must be a finite number, got nan"),
    (["generate", "--model", "demo", "--classes", "1", "--temperature", "inf", "--save-tokens", "x.npy"],
     "temperature must be a finite number, got inf"),
    (["generate", "--model", "demo", "--classes", "1", "--cfg-scale", "nan", "--save-tokens", "x.npy"],
     "cfg-scale must be a finite number"),
    (["generate", "--model", "demo", "--classes", "1", "--seed", str(2**64), "--save-tokens", "x.npy"],
     "seed must be in [0, 2**63)"),
    (["generate", "--model", "demo", "--classes", "3x0,4", "--save-tokens", "x.npy"], "bad repeat count in '3x0'"),
    (["generate", "--model", "demo", "--classes", "1x100000000", "--save-tokens", "x.npy"], "more than 100000 images"),
    (["generate", "--model", "demo-arpg", "--classes", "1", "--steps", "1000", "--save-tokens", "x.npy"],
     "arpg steps must be in [1, 64]"),
    (["generate", "--model", "demo", "--classes", "1", "--method", "sjd", "--window", "1000", "--save-tokens", "x.npy"],
     "sjd window 1000 exceeds this engine's largest verify block of 64 tokens"),
    (["generate", "--model", "demo", "--classes", "1", "--device", "banana", "--save-tokens", "x.npy"], "unknown device 'banana'"),
    (["generate", "--model", "GPT-B", "--random-init", "--model-config", "n_head=0", "--classes", "1", "--save-tokens", "x.npy"],
     "n_head must be >= 1"),
    (["generate", "missing_engine", "--backend", "ort", "--classes", "1", "--save-tokens", "x.npy"],
     "engine directory not found: missing_engine"),
    (["generate", "--model", "demo", "--classes", "1", "--method", "best-of-n", "--scorer", "builtins:len", "--save-tokens", "x.npy"],
     "scorer 'len' failed: TypeError"),
    (["generate", "--model", "demo", "--classes", "1", "--method", "best-of-n", "--scorer", "builtins:id", "--save-tokens", "x.npy"],
     "scorer 'id' failed: TypeError"),
])
def test_bad_input_is_one_line_error(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AREXPORT_TOKEN", raising=False)
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code != 0
    assert message in res.output, res.output
    assert "Traceback" not in res.output
    assert len([ln for ln in res.output.strip().splitlines() if ln.startswith("Error")]) == 1


def test_generate_without_outputs_writes_a_fresh_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for expect in ("out/demo", "out/demo-2"):
        res = CliRunner().invoke(cli, ["generate", "--model", "demo", "--classes", "1,2"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert sorted(p.name for p in (tmp_path / expect).iterdir()) == ["0000.png", "0001.png"]
        assert f"-> images {expect}/" in res.output


def test_unreadable_and_non_checkpoint_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.pt").write_bytes(b"\x00\x01not a checkpoint")
    res = CliRunner().invoke(cli, ["generate", "--model", "GPT-B", "--checkpoint", "garbage.pt", "--classes", "1", "--save-tokens", "x.npy"])
    assert res.exit_code == 1 and "not a readable PyTorch checkpoint: garbage.pt" in res.output and "Traceback" not in res.output
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    res = CliRunner().invoke(cli, ["generate", "--model", "GPT-B", "--checkpoint", "meta.pt", "--classes", "1", "--save-tokens", "x.npy"])
    assert res.exit_code == 1 and "no state dict found" in res.output


def test_tokens_outside_vocabulary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "bad.npy", np.full((1, 64), 17, dtype=np.int64))
    res = CliRunner().invoke(cli, ["decode", "demo", "--tokens", "bad.npy", "--out", "d"])
    assert res.exit_code == 1 and "token ids outside the vocabulary [0, 17)" in res.output
    np.save(tmp_path / "shape.npy", np.zeros((1, 10), dtype=np.int64))
    res = CliRunner().invoke(cli, ["decode", "demo", "--tokens", "shape.npy", "--out", "d"])
    assert res.exit_code == 1 and "tokens must be a non-empty integer array [N, 64]" in res.output


def test_help_documents_every_option():
    res = run("generate", "--help")
    for opt in ("--model", "--checkpoint", "--random-init", "--vq-checkpoint", "--classes", "--method", "--backend", "--cfg-scale",
                "--top-k", "--top-p", "--temperature", "--seed", "--batch-size", "--save-tokens", "--out", "--stats-json"):
        assert opt in res.output, opt


def test_decode_of_an_empty_array_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "empty.npy", np.zeros((0, 64), dtype=np.int64))
    res = CliRunner().invoke(cli, ["decode", "demo", "--tokens", "empty.npy", "--out", "d"])
    assert res.exit_code == 1 and "non-empty integer array" in res.output and not (tmp_path / "d").exists()


def test_non_finite_logits_stop_generation():
    """A checkpoint with NaNs stops with the step and row named instead of all-black images."""
    from arexport.errors import ArexportError
    from arexport.runtime.generator import Generator

    gen = Generator.load("demo")
    with torch.no_grad():
        gen.engine.model.output.weight[3, 0] = float("nan")
    with pytest.raises(ArexportError, match=r"non-finite logits from the torch engine at prefill call 1 in row 0"):
        gen.generate(classes=[1], images=False)


@pytest.mark.parametrize("args", [
    ["generate", "--model", "demo", "--classes", "1", "--save-tokens", "{f}/x.npy"],
    ["generate", "--model", "demo", "--classes", "1", "--out", "{f}/imgs"],
    ["generate", "--model", "demo", "--classes", "1", "--stats-json", "{f}/s.json"],
    ["build", "demo", "--out", "{f}/engine"],
    ["profile", "--model", "demo", "--classes", "1", "--json", "{f}/p.json"],
    ["decode", "demo", "--tokens", "{t}", "--grid", "{f}/g.png"],
])
def test_unwritable_outputs_fail_before_the_work(tmp_path, monkeypatch, args):
    """An output under a regular file cannot be created: a one-line error naming the flag, before any model runs."""
    import numpy as np

    from arexport.runtime import generator

    f = tmp_path / "afile"
    f.write_text("x")
    np.save(tmp_path / "t.npy", np.zeros((1, 64), dtype=np.int64))
    monkeypatch.setattr(generator.Generator, "load", classmethod(lambda *a, **k: pytest.fail("loaded a model first")))
    res = CliRunner().invoke(cli, [a.format(f=f, t=tmp_path / "t.npy") for a in args])
    assert res.exit_code == 1, res.output
    assert "cannot be created" in res.output and "is a file, not a directory" in res.output and "Traceback" not in res.output


def _build_then_signal(tmp_path, sig):
    """Start `arexport build demo`, wait until its temp directory exists, send sig; return (proc, parent)."""
    import signal  # noqa: F401
    import subprocess
    import sys
    import time

    parent = tmp_path / "engines"
    parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "arexport", "build", "demo", "--out", str(parent / "demo")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(parent.glob(".demo.building.*")):
        assert time.time() < deadline and proc.poll() is None, "the build never started"
        time.sleep(0.05)
    time.sleep(0.5)  # mid-export
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc, parent


def test_kill_9_during_build_leaves_a_directory_the_next_build_removes(tmp_path):
    import signal

    proc, parent = _build_then_signal(tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert list(parent.glob(".demo.building.*")), "kill -9 cannot clean up"
    res = CliRunner().invoke(cli, ["build", "demo", "--out", str(parent / "other"), "--no-images"])
    assert res.exit_code == 0, res.output
    assert "removed" in res.output  # the stale directory is reported (rich wraps the line)
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")]
    assert (parent / "other" / "manifest.json").exists()


def test_sigterm_during_build_removes_the_partial_directory(tmp_path):
    import signal

    proc, parent = _build_then_signal(tmp_path, signal.SIGTERM)
    assert proc.returncode == 143
    assert list(parent.iterdir()) == []


def test_threads_policy_small_torch_models_use_one_thread(monkeypatch, tmp_path):
    import torch

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    args = ["generate", "--model", "demo", "--classes", "1", "--save-tokens", str(tmp_path / "t.npy")]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert seen == [1]  # the demo has well under 20M step weights
    assert CliRunner().invoke(cli, args + ["--threads", "2"]).exit_code == 0
    assert seen == [1, 2]
    res = CliRunner().invoke(cli, args + ["--threads", "0"])
    assert res.exit_code == 2 and "--threads" in res.output


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    import arexport.cli as cli_mod

    monkeypatch.setattr(cli_mod, "PLAIN_PROGRESS_EVERY_S", 0.0)
    res = CliRunner().invoke(cli, ["generate", "--model", "demo", "--classes", "1,2", "--save-tokens", str(tmp_path / "t.npy")])
    lines = [line for line in res.output.splitlines() if line.startswith("generating: ")]
    assert res.exit_code == 0 and len(lines) >= 2 and lines[-1].startswith("generating: 128/128 tokens (100%)")
    res = CliRunner().invoke(cli, ["generate", "--model", "demo", "--classes", "1", "--save-tokens", str(tmp_path / "t.npy"),
                                   "--no-progress"])
    assert "generating: " not in res.output


def test_profile_table_fits_80_columns_without_ellipses(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    res = CliRunner().invoke(cli, ["profile", "--model", "demo", "--compare", "torch:ar,torch:sjd", "--classes", "1",
                                   "--repeats", "1", "--warmup", "0", "--no-bandwidth"])
    assert res.exit_code == 0, res.output
    table = res.output[res.output.index("latency profile"):]
    assert "…" not in table and "..." not in table
    assert max(len(line) for line in table.splitlines()) <= 80
    assert "images/s" in table and "torch:sjd" in table
