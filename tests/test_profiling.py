"""Profiler arithmetic, the bandwidth floor's byte counts, the JSON schema and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from arexport.cli import cli
from arexport.models.registry import load_model, model_config
from arexport.profiling.bandwidth import DTYPE_BYTES, floor_seconds, mean_live_tokens, measure_copy_bandwidth, step_bytes
from arexport.profiling.profiler import RunConfig, summarize_steps
from arexport.runtime.engine import StepRecord
from arexport.runtime.stats import percentiles


def test_percentiles_match_linear_interpolation():
    vals = list(range(1, 101))
    p = percentiles(vals)
    assert p == {"p50": 50.5, "p90": pytest.approx(90.1), "p99": pytest.approx(99.01)}
    assert percentiles([]) == {}
    assert percentiles([3.0]) == {"p50": 3.0, "p90": 3.0, "p99": 3.0}


def test_summarize_steps_groups_by_kind_in_order():
    recs = [StepRecord("decode", 2, 1, s / 1000) for s in (1, 2, 3, 4)] + [StepRecord("prefill", 2, 1, 0.010)]
    out = summarize_steps(recs)
    assert list(out) == ["prefill", "decode"]
    assert out["decode"]["count"] == 4 and out["decode"]["p50_ms"] == pytest.approx(2.5)
    assert out["decode"]["mean_ms"] == pytest.approx(2.5) and out["prefill"]["p99_ms"] == pytest.approx(10.0)


def test_step_bytes_for_llamagen_b():
    cfg = model_config("llamagen-c2i-B")
    d, f, v = 768, cfg.ffn_hidden, 16384
    per_layer = d * 3 * d + d * d + 3 * d * f + 2 * d
    expected_params = 12 * per_layer + d + d * v
    spec = cfg.spec("b")
    b = step_bytes(spec, "bf16", "bf16", rows=2, live_tokens=129.0, weight_params=expected_params)
    assert b.weights == expected_params * 2
    assert b.kv == 2 * 12 * 2 * 12 * 129.0 * 64 * 2
    assert mean_live_tokens(spec) == 1 + 255 / 2
    assert floor_seconds(1e9, 2e12) == 5e-4
    assert DTYPE_BYTES["int4"] == 0.5


def test_registry_records_step_weight_params():
    lm = load_model("llamagen-c2i-B", random_init=True, overrides={"n_layer": 2})
    cfg = lm.model.cfg
    d, f = cfg.dim, cfg.ffn_hidden
    assert lm.spec.extra["step_weight_params"] == 2 * (4 * d * d + 3 * d * f + 2 * d) + d + d * 16384


def test_copy_bandwidth_is_measured():
    bw = measure_copy_bandwidth("cpu", mib=16, repeats=2)
    assert 1e8 < bw < 1e13


def test_run_config_parse():
    c = RunConfig.parse("ort:sjd:window=16;init=random")
    assert (c.backend, c.method, c.options) == ("ort", "sjd", {"window": 16, "init": "random"})
    assert c.label == "ort:sjd[window=16,init=random]"
    with pytest.raises(ValueError, match="expected backend:method"):
        RunConfig.parse("ort")


def test_profile_cli_json_schema_and_plot(tmp_path):
    res = CliRunner().invoke(cli, ["profile", "--model", "demo", "--classes", "1,2", "--batch-size", "2", "--repeats", "2",
                                   "--compare", "torch:ar,torch:sjd:window=8", "--json", str(tmp_path / "p.json"),
                                   "--plot", str(tmp_path / "p.png")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["schema"] == "arexport-profile" and doc["version"] == 1
    assert doc["context"]["model"] == "demo" and doc["context"]["copy_bandwidth_gbps"] > 0
    ar, sjd = doc["results"]
    for r in (ar, sjd):
        for key in ("label", "steps", "image_ms", "images_per_s", "tokens_per_s", "target_forwards_per_image",
                    "peak_memory_bytes", "trace", "bandwidth", "engine_ms_per_step", "host_ms_per_step"):
            assert key in r, key
        assert set(r["image_ms"]) == {"p50", "p90", "p99"}
    assert ar["steps"]["decode"]["count"] == 2 * 63 and ar["target_forwards_per_image"] == 64
    assert "verify" in sjd["steps"] and sjd["target_forwards_per_image"] < 64
    assert ar["bandwidth"]["floor_ms"] > 0 and 0 < ar["bandwidth"]["fraction_of_floor"] < 1
    assert "x ms/image vs [1]" in res.output and "[1] = torch:ar" in res.output
    png = (tmp_path / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_gpu_runbook_runs_on_the_cpu_in_smoke_mode(tmp_path):
    """`bash benchmarks/gpu_all.sh DIR --device cpu --smoke` (the run-book, with the profile on the demo
    models) runs end to end and writes the test log, the JSON and the markdown table, listing what it
    skipped; on a GPU machine the same code runs XL shapes."""
    import subprocess

    root = Path(__file__).parent.parent
    res = subprocess.run(["bash", str(root / "benchmarks" / "gpu_all.sh"), str(tmp_path), "--device", "cpu", "--smoke"],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "skipped" in (tmp_path / "gpu_tests.txt").read_text()  # the CUDA tests skip here, with their reason
    doc = json.loads((tmp_path / "gpu_all.json").read_text())
    assert {r["config"] for r in doc["rows"]} == {"torch:ar", "torch:sjd[window=16]", "torch:sjd", "torch:arpg[steps=16]",
                                                  "ort:ar"}  # ORT's static-buffer path, on the CPU (issue 29)
    assert {(d["backend"], d["batch"]) for d in doc["decoder"]} == {(b, n) for b in ("torch", "ort") for n in (1, 8, 32)}
    assert all(d["images/s"] > 0 for d in doc["decoder"]) and all(r["step floor fraction"] > 0 for r in doc["rows"])
    assert all(r["fwd/image"] > 0 and r["host ms/step"] >= 0 for r in doc["rows"]) and doc["not_run"] == []
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        assert any(s.startswith("trt:") for s in doc["skipped"])  # no TensorRT here, and it says so
    md = (tmp_path / "gpu_all.md").read_text()
    assert "| model |" in md and "| judge accuracy | judge FD | tokens = ar | token TV vs ar |" in md
    for r in doc["rows"]:  # quality beside each config's speed (profiling/quality_column.py), the judges on the demos
        q = r["result"]["quality"]
        assert q["images"] == 4 and 0.0 <= r["judge accuracy"] <= 1.0 and r["judge FD"] >= 0.0, r["config"]
        if "arpg" in r["config"]:  # demo-arpg has no raster ar to compare with, and the table says so
            assert (r["tokens = ar"], r["token TV vs ar"]) == ("-", "-") and q["vs_ar"].startswith("not available")
            continue
        assert 0.0 <= r["tokens = ar"] <= 1.0 and 0.0 <= r["token TV vs ar"] <= 1.0, r["config"]
        if r["config"].endswith(":ar"):
            assert (r["tokens = ar"], r["token TV vs ar"]) == (1.0, 0.0)
    # sjd is lossless in distribution, not token for token under sampling: compared with ar, not copied from it
    assert all(r["tokens = ar"] < 1.0 for r in doc["rows"] if "sjd" in r["config"])
    sweep = json.loads((tmp_path / "batch_sweep.json").read_text())["rows"]  # step 3: the batch sweep (issue 35)
    assert [r["images"] for r in sweep] == [1, 2] and all(0 < r["fraction of floor (decode)"] for r in sweep)


def test_gpu_runbook_profile_lists_what_its_time_budget_left_out(tmp_path):
    """With its time budget spent, the profile starts no config and lists each as not run."""
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "benchmarks" / "gpu_all.py"
    res = subprocess.run([sys.executable, str(script), "--device", "cpu", "--smoke", "--budget-s", "0", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_all.json").read_text())
    assert doc["rows"] == [] and len(doc["not_run"]) == 5
    assert "not run (time budget): demo batch 1 cuda graph no torch:ar" in (tmp_path / "gpu_all.md").read_text()


def test_latency_curves_from_a_profile_json_replace_measuring(demo_engine, tmp_path):
    """profile --json records the curves latency-aware speculation prices steps with (one image's rows,
    up to the default window); --latency-profile loads them back without measuring, and they are what
    the speculative defaults then read (runtime/step_cost.py)."""
    import json

    from click.testing import CliRunner

    from arexport.cli import cli
    from arexport.errors import ArexportError
    from arexport.runtime.generator import Generator

    out = tmp_path / "p.json"
    r = CliRunner().invoke(cli, ["profile", str(demo_engine), "--compare", "ort:sjd", "--classes", "0", "--repeats", "1",
                                 "--no-bandwidth", "--json", str(out)])
    assert r.exit_code == 0, r.output
    curves = json.loads(out.read_text())["results"][0]["latency_curves"]["target"]
    (key, values), = curves.items()
    rows, max_q = map(int, key.split(","))
    gen = Generator.load(str(demo_engine), backend="ort", latency_profile=str(out))
    gen.engine._forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured"))
    assert gen.engine.latency_curve(rows, max_q).tolist() == values
    assert (rows, max_q) == (2, 8)  # CFG rows of one image; the engine's largest verify block (8 < 16)
    from arexport.runtime.step_cost import prices

    assert prices(gen.engine, 2, 8).target.tolist() == values and prices(gen.engine, 2, 8).source == "profile"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "arexport-profile", "context": {"model": "demo-arpg"}, "results": []}))
    with pytest.raises(ArexportError, match="profiles 'demo-arpg', not 'demo'"):
        Generator.load(str(demo_engine), backend="ort", latency_profile=str(bad))
    with pytest.raises(ArexportError, match="no latency curves measured on torch"):
        Generator.load(str(demo_engine), backend="torch", latency_profile=str(out))
