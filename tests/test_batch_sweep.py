"""`arexport profile --batch-sweep` (issue 35 item 3): the sweep's arithmetic (bytes, floor, ratio to ar,
where a method stops paying), its input checks, and one small end-to-end run on the demo engine."""

from __future__ import annotations

import json

import pytest

from arexport.errors import ArexportError
from arexport.profiling.sweep import SweepRow, parse_batches, run_sweep, stops_paying, sweep_lines


def _row(label, method, images, ips):
    return SweepRow(label, method, images, 2 * images, 1.0, ips, 64.0, 1e6, 0.5, 0.5)


def test_ratio_to_ar_and_where_a_method_stops_paying():
    speeds = {("ar", 1): 10.0, ("sjd", 1): 15.0, ("ar", 8): 40.0, ("sjd", 8): 44.0, ("ar", 32): 80.0, ("sjd", 32): 80.0,
              ("arpg", 1): 9.0, ("arpg", 8): 60.0, ("arpg", 32): 200.0}
    points = [(b, m) for b in (1, 8, 32) for m in ("ar", "sjd", "arpg")]
    rows = run_sweep(points, lambda b, m: _row(f"ort:{m}", m, b, speeds[(m, b)]))
    assert [round(r.vs_ar, 3) for r in rows if r.method == "sjd"] == [1.5, 1.1, 1.0]
    assert stops_paying(rows) == {"ort:sjd": 32, "ort:arpg": 1}
    # negative control: a sweep where sjd stays ahead never reports a stop
    speeds[("sjd", 32)] = 81.0
    rows = run_sweep(points, lambda b, m: _row(f"ort:{m}", m, b, speeds[(m, b)]))
    assert stops_paying(rows)["ort:sjd"] is None
    assert any("faster than ar at every batch size swept" in line for line in sweep_lines(rows))


def test_batch_sizes_are_checked():
    assert parse_batches("32,1,8,8") == [1, 8, 32]
    for bad in ("", "1,x", "0,8", "100000"):
        with pytest.raises(ArexportError, match="--batch-sweep"):
            parse_batches(bad)


def test_profile_batch_sweep_on_the_demo_engine(demo_engine, tmp_path):
    from click.testing import CliRunner

    from arexport.cli import cli

    out = tmp_path / "sweep.json"
    r = CliRunner().invoke(cli, ["profile", str(demo_engine), "--compare", "ort:ar,ort:sjd", "--batch-sweep", "1,2",
                                 "--repeats", "1", "--warmup", "0", "--no-bandwidth", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["batch_sweep"]
    assert [(x["method"], x["images"], x["rows"]) for x in rows] == [("ar", 1, 2), ("sjd", 1, 2), ("ar", 2, 4), ("sjd", 2, 4)]
    assert all(x["step_ms"] > 0 and x["images_per_s"] > 0 and x["bytes_per_step"] > 0 for x in rows)
    assert rows[0]["forwards_per_image"] == 64 and rows[0]["vs_ar"] == 1.0
    assert rows[2]["bytes_per_step"] > rows[0]["bytes_per_step"]  # one more row's K/V, the same weights
    assert "| ort:sjd | 2 | 4 |" in r.output
    bad = CliRunner().invoke(cli, ["profile", str(demo_engine), "--batch-sweep", "1,0"])
    assert bad.exit_code != 0 and "--batch-sweep" in bad.output
