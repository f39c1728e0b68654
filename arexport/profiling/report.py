"""Render profiles: a rich table, a JSON document, and a PNG (per-step latency, CDF per config)."""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

from arexport.profiling.profiler import SCHEMA_VERSION, ProfileResult


def to_json(results: list[ProfileResult], context: dict[str, Any]) -> dict[str, Any]:
    """The --json document: schema version, context (model, machine, date) and one entry per config."""
    return {"schema": "arexport-profile", "version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "context": context, "results": [r.as_dict() for r in results]}


def print_table(results: list[ProfileResult], console, compare: bool = False) -> None:
    from rich.table import Table

    kinds = []
    for r in results:
        kinds += [k for k in r.steps if k not in kinds]
    # one column per config, one row per metric: fits 80 columns for a few configs, and cells wrap
    # (never "...") when there are more
    t = Table(title="latency profile (ms)")
    t.add_column("metric", overflow="fold")
    for r in results:
        t.add_column(r.label, overflow="fold", justify="right")
    for k in kinds:
        t.add_row(f"{k} p50/p90/p99", *[f"{s['p50_ms']:.2f}/{s['p90_ms']:.2f}/{s['p99_ms']:.2f}" if (s := r.steps.get(k)) else "-"
                                         for r in results])
        t.add_row(f"{k} calls", *[str(r.steps[k]["count"]) if k in r.steps else "-" for r in results])
    rows = [("ms/image p50", lambda r: f"{r.image_ms.get('p50', float('nan')):.1f}"),
            ("images/s", lambda r: f"{r.images_per_s:.2f}"), ("tokens/s", lambda r: f"{r.tokens_per_s:.0f}"),
            ("fwd/image", lambda r: f"{r.target_forwards_per_image:.1f}"),
            ("engine ms/step", lambda r: f"{r.engine_ms_per_step:.2f}"),
            ("host ms/step", lambda r: f"{r.host_ms_per_step:.2f}"),
            ("mean accepted", lambda r: f"{r.mean_accepted_length:.2f}" if r.mean_accepted_length else "-"),
            ("peak mem MiB", lambda r: f"{r.peak_memory_bytes / 2**20:.0f}")]
    for name, cell in rows:
        t.add_row(name, *[cell(r) for r in results])
    console.print(t)
    for r in results:
        bw = r.bandwidth
        if bw:
            console.print(f"{r.label}: a decode step must read {bw['bytes_per_decode_step'] / 2**20:.1f} MiB "
                          f"(weights {bw['weight_bytes'] / 2**20:.1f} + live KV {bw['kv_bytes'] / 2**20:.1f}); measured copy "
                          f"bandwidth {bw['copy_bandwidth_gbps']:.1f} GB/s -> floor {bw['floor_ms']:.3f} ms; decode p50 "
                          f"{bw['decode_p50_ms']:.3f} ms = {bw['decode_p50_ms'] / bw['floor_ms']:.2f}x the floor "
                          f"({100 * bw['fraction_of_floor']:.0f}% of peak)")
    if compare and len(results) > 1:
        base = results[0]
        console.print(f"ratios vs {base.label}:")
        for r in results[1:]:
            parts = [f"ms/image x{r.image_ms['p50'] / base.image_ms['p50']:.2f}"]
            for k in r.steps:
                if k in base.steps:
                    parts.append(f"{k} p50 x{r.steps[k]['p50_ms'] / base.steps[k]['p50_ms']:.2f}")
            parts.append(f"fwd/image x{r.target_forwards_per_image / base.target_forwards_per_image:.2f}")
            console.print(f"  {r.label}: " + ", ".join(parts))


def plot(results: list[ProfileResult], path: str | os.PathLike) -> None:
    """Two panels: step latency along one generation, and the CDF of step latencies per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from arexport.fileio import atomic_write_bytes

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        ms = [s["ms"] for s in r.trace]
        a.plot(range(len(ms)), ms, marker=".", linewidth=0.8, label=r.label)
        steps = np.sort([s["ms"] for s in r.trace])
        if len(steps):
            b.step(steps, np.arange(1, len(steps) + 1) / len(steps), where="post", label=r.label)
    a.set_xlabel("engine call in one generation")
    a.set_ylabel("latency (ms)")
    a.set_title("latency per step over the image")
    a.set_yscale("log")
    b.set_xlabel("step latency (ms)")
    b.set_ylabel("fraction of steps")
    b.set_xscale("log")
    b.set_title("CDF per config")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
