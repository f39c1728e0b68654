"""Helpers shared by the benchmark scripts: machine description, timing, markdown tables."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch


def machine() -> str:
    """One line: CPU model and cores (or GPU name), RAM, torch and onnxruntime versions, date."""
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    import onnxruntime

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}; torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}; {_dt.date.today().isoformat()}")


def time_calls(fn: Callable[[], object], warmup: int, iters: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Wall-clock seconds of `iters` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def summary_ms(secs: list[float]) -> dict[str, float]:
    """median / p90 / min in milliseconds."""
    ms = sorted(s * 1e3 for s in secs)
    return {"median_ms": statistics.median(ms), "p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))], "min_ms": ms[0]}


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    """A GitHub markdown table of rows restricted to cols (floats with 3 significant digits)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def config_label(method: str, opts: dict) -> str:
    """`method k=v,k=v`: a method and its options as one table cell."""
    return method + ("" if not opts else " " + ",".join(f"{k}={v}" for k, v in opts.items()))


def emit(header: str, rows: list[dict], cols: list[str], json_path=None) -> None:
    """Print the header line and the markdown table of rows; write both as JSON to json_path if given."""
    print(header)
    print(markdown_table(rows, cols))
    if json_path:
        import json
        from pathlib import Path

        Path(json_path).write_text(json.dumps({"header": header, "rows": rows}, indent=2))


QUALITY_COLS = ["acc CNN", "FD CNN", "acc MLP", "FD MLP"]


def digit_quality(tokens, classes) -> dict[str, float]:
    """Demo quality under both judges: class accuracy and feature distance to real digits (QUALITY_COLS)."""
    from arexport.quality import score_digits

    out = {}
    for judge in ("cnn", "mlp"):
        s = score_digits(tokens, classes, judge)
        out[f"acc {judge.upper()}"], out[f"FD {judge.upper()}"] = s.accuracy, s.feature_distance
    return out


def git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
