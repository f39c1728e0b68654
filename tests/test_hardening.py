"""Hardening (issue 38): no data loss from build, refused absurd sizes and thresholds, one-line errors.

HTTP hardening (admission, cancellation, fuzz) is in tests/test_serving_hardening.py."""

from __future__ import annotations

import os
import threading

import pytest
from click.testing import CliRunner

from arexport.cli import cli
from arexport.errors import ArexportError
from arexport.fileio import atomic_directory, remove_stale_builds

DEAD_PID = 4_000_000  # above Linux's pid_max (4194304 max is 2**22; default 32768 or 4194304): check it below


def _dead_pid() -> int:
    for pid in (DEAD_PID, 3_999_999, 3_999_998):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
    pytest.skip("no dead pid found")


# -- item 1: build data loss ------------------------------------------------------------------------

def test_stale_cleanup_deletes_only_marked_temp_directories(tmp_path):
    pid = _dead_pid()
    user = {  # names the old cleanup matched, each holding a user's file
        ".mydata.old.99999999.keep": "precious",
        f".photos.building.{pid}.bak": "photos",
        f".forged.building.{pid}." + "a" * 32: "no marker inside",  # our exact name pattern, no marker
        f".wrongmark.old.{pid}." + "b" * 32: "marker with another token",
    }
    for name, text in user.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "file.txt").write_text(text)
    (tmp_path / f".wrongmark.old.{pid}." / "x").parent  # noqa: B018 (path only)
    (tmp_path / (f".wrongmark.old.{pid}." + "b" * 32) / ".arexport-temp").write_text("arexport temp " + "c" * 32 + "\n")
    ours = tmp_path / (f".demo.building.{pid}." + "d" * 32)  # what a kill -9'd build leaves
    ours.mkdir()
    (ours / ".arexport-temp").write_text("arexport temp " + "d" * 32 + "\n")
    (ours / "step.onnx").write_bytes(b"partial")
    removed = remove_stale_builds(tmp_path)
    assert removed == [ours] and not ours.exists()
    for name, text in user.items():
        assert (tmp_path / name / "file.txt").read_text() == text, name


def test_overwrite_refuses_a_directory_that_is_not_an_engine(tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "cat.jpg").write_bytes(b"jpeg")
    with pytest.raises(ArexportError, match="not an arexport engine.*--overwrite-any-directory"):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "manifest.json").write_text("{}")
    assert (target / "cat.jpg").read_bytes() == b"jpeg"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no temp dir, no lock file left
    (target / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ArexportError, match="not an arexport engine"):
        with atomic_directory(target, overwrite=True):
            pass
    (target / "manifest.json").write_text('{"format": "arexport-engine"}')  # an engine directory: replaced
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new").write_text("1")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "a").write_text("a")
    with atomic_directory(other, overwrite=True, replace_any=True) as tmp:  # the explicit flag
        (tmp / "b").write_text("b")
    assert sorted(p.name for p in other.iterdir()) == ["b"]


def test_second_concurrent_writer_fails_instead_of_replacing(tmp_path):
    target = tmp_path / "engine"
    inside, release, errors = threading.Event(), threading.Event(), []

    def first():
        with atomic_directory(target) as tmp:
            (tmp / "first").write_text("1")
            inside.set()
            release.wait(30)

    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(30)
    try:
        with pytest.raises(ArexportError, match="another arexport process is writing"):
            with atomic_directory(target, overwrite=True) as tmp:
                (tmp / "second").write_text("2")
    finally:
        release.set()
        t.join(30)
    assert not errors and sorted(p.name for p in target.iterdir()) == ["first"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]  # the lock file is gone
    with pytest.raises(FileExistsError):  # after the first finished, a plain second build refuses
        with atomic_directory(target):
            pass


@pytest.mark.parametrize("out", [".", "..", "/"])
def test_build_out_dot_is_a_one_line_error(tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("k")
    res = CliRunner().invoke(cli, ["build", "demo", "--out", out, "--overwrite", "--no-images"])
    assert res.exit_code == 1 and "current directory" in res.output and "Traceback" not in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_build_cli_keeps_user_directories_and_refuses_non_engine_overwrite(tmp_path):
    (tmp_path / ".mydata.old.99999999.keep").mkdir()
    (tmp_path / ".mydata.old.99999999.keep" / "f").write_text("x")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_text("a")
    res = CliRunner().invoke(cli, ["build", "demo", "--out", str(photos), "--overwrite", "--no-images"])
    assert res.exit_code == 1 and "not an arexport engine" in res.output, res.output
    res = CliRunner().invoke(cli, ["build", "demo", "--out", str(tmp_path / "e"), "--no-images"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / ".mydata.old.99999999.keep" / "f").read_text() == "x"
    assert (photos / "a.jpg").exists() and (tmp_path / "e" / "manifest.json").exists()
    res = CliRunner().invoke(cli, ["build", "demo", "--out", str(tmp_path / "e"), "--overwrite", "--no-images"])
    assert res.exit_code == 0, res.output  # an engine directory is replaced as before


# -- items 6-8 on the CLI ----------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "demo", "--classes", "99999999999999999999999", "--save-tokens", "{t}/a.npy"], "out of range"),
    (["generate", "--model", "demo", "--image-size", "0", "--classes", "1", "--save-tokens", "{t}/a.npy"], "--image-size"),
    (["generate", "--model", "demo", "--image-size", "-16", "--classes", "1", "--save-tokens", "{t}/a.npy"], "--image-size"),
    (["generate", "--model", "demo", "--classes", "1", "--save-tokens", "{t}/a.npy", "--stats-json", "{t}/a.npy"],
     "name the same path"),
    (["generate", "--model", "demo", "--classes", "1", "--cfg-scale", "1e308", "--save-tokens", "{t}/a.npy"], "cfg-scale must be in"),
    (["generate", "--model", "demo", "--classes", "1", "--temperature", "1e-300", "--save-tokens", "{t}/a.npy"], "temperature"),
    (["generate", "--model", "demo", "--method", "gridar", "--candidates", "100000000", "--classes", "1",
      "--save-tokens", "{t}/a.npy"], "memory budget"),
    (["decode", "demo", "--tokens", "{t}/t.npz", "--out", "{t}/d"], "not a .npy array"),
    (["calibrate", "{t}/nowhere", "--mode", "int8", "--out", "{t}/q", "--min-agreement", "nan"], "--min-agreement"),
    (["serve", "--model", "demo", "--max-batch", "100000"], "max batch must be in"),
])
def test_cli_refuses_absurd_values_in_one_line(tmp_path, args, message):
    import numpy as np

    np.savez(tmp_path / "t.npz", a=np.zeros((2, 64), dtype=np.int64))
    res = CliRunner().invoke(cli, [a.format(t=tmp_path) for a in args])
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "a.npy").exists()


def test_verify_refuses_nan_tolerance_and_a_batch_over_budget(demo_engine, monkeypatch):
    res = CliRunner().invoke(cli, ["verify", str(demo_engine), "--atol", "nan"])
    assert res.exit_code == 1 and "--atol must be a finite number" in res.output
    monkeypatch.setenv("AREXPORT_MEMORY_BUDGET_GB", "0.5")
    res = CliRunner().invoke(cli, ["verify", str(demo_engine), "--batch", "100000"])
    assert res.exit_code == 1 and "verify --batch 100000 needs an estimated" in res.output and "0.50 GiB" in res.output, res.output


def test_memory_budget_error_names_estimate_and_budget(monkeypatch):
    from arexport.budget import MemoryBudgetError, check

    monkeypatch.setenv("AREXPORT_MEMORY_BUDGET_GB", "1")
    check("small", 2**29)
    with pytest.raises(MemoryBudgetError, match=r"big needs an estimated 2.00 GiB; the memory budget is 1.00 GiB"):
        check("big", 2**31)
    monkeypatch.setenv("AREXPORT_MEMORY_BUDGET_GB", "nan")
    with pytest.raises(ArexportError, match="positive number"):
        check("x", 1)


def test_manifest_paths_stay_inside_the_engine_directory(demo_engine, tmp_path):
    import json
    import shutil

    from arexport.errors import ManifestError
    from arexport.format.manifest import read_manifest

    for field_edit, message in [
        (lambda m: m["files"].__setitem__("../../../../etc/hostname", {"bytes": 1, "sha256": "0" * 64}), "plain file name"),
        (lambda m: m["spec"].__setitem__("s_max", 10**9), "implausible"),
    ]:
        d = tmp_path / "e"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(demo_engine, d)
        m = json.loads((d / "manifest.json").read_text())
        field_edit(m)
        (d / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ManifestError, match=message):
            read_manifest(d)
        res = CliRunner().invoke(cli, ["inspect", str(d)])
        assert res.exit_code == 1 and message in res.output


def test_interrupted_image_writing_leaves_a_partial_marker(tmp_path, monkeypatch):
    from arexport import fileio

    calls = []

    def failing_png(path, img):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what SIGINT/SIGTERM-as-exit does mid-set
        real(path, img)

    real = fileio.atomic_save_png
    monkeypatch.setattr(fileio, "atomic_save_png", failing_png)
    out = tmp_path / "imgs"
    res = CliRunner().invoke(cli, ["generate", "--model", "demo", "--classes", "1,2,3", "--out", str(out)])
    assert res.exit_code == 130
    assert (out / "PARTIAL.txt").exists() and "3 images" in (out / "PARTIAL.txt").read_text()
    monkeypatch.setattr(fileio, "atomic_save_png", real)
    res = CliRunner().invoke(cli, ["generate", "--model", "demo", "--classes", "1,2,3", "--out", str(out)])
    assert res.exit_code == 0 and not (out / "PARTIAL.txt").exists() and len(list(out.glob("*.png"))) == 3
