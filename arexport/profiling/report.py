"""Render profiles: a rich table, a JSON document, and a PNG (per-step latency, CDF per config)."""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

from arexport.profiling.profiler import SCHEMA_VERSION, ProfileResult
from arexport.profiling.quality_column import quality_rows


def to_json(results: list[ProfileResult], context: dict[str, Any]) -> dict[str, Any]:
    """The --json document: schema version, context (model, machine, date) and one entry per config."""
    return {"schema": "arexport-profile", "version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "context": context, "results": [r.as_dict() for r in results]}


IMAGE_DECODER_KINDS = ("vq_decode", "latent_decode", "text_encode")  # not steps of the decoding loop


def column_labels(results: list[ProfileResult]) -> list[str]:
    """Each config's label, made distinct: a config given twice gets #2, #3, ..."""
    seen: dict[str, int] = {}
    out = []
    for r in results:
        seen[r.label] = seen.get(r.label, 0) + 1
        out.append(r.label if seen[r.label] == 1 else f"{r.label}#{seen[r.label]}")
    return out


def _cells(results: list[ProfileResult], compare: bool = False) -> list[tuple[str, list[str]]]:
    """(metric, one short cell per config): every number in a cell of its own, so no cell has to wrap;
    with `compare`, ratios to the first config ([1]) too."""
    kinds = []
    for r in results:
        kinds += [k for k in r.steps if k not in kinds]
    rows = []
    for k in kinds:
        for p in ("p50", "p90", "p99"):
            rows.append((f"{k} {p} ms", [f"{s[p + '_ms']:.2f}" if (s := r.steps.get(k)) else "-" for r in results]))
        rows.append((f"{k} calls", [str(r.steps[k]["count"]) if k in r.steps else "-" for r in results]))
    more = [("ms/image p50", lambda r: f"{r.image_ms.get('p50', float('nan')):.1f}"),
            ("images/s", lambda r: f"{r.images_per_s:.2f}"), ("tokens/s", lambda r: f"{r.tokens_per_s:.0f}"),
            ("fwd/image", lambda r: f"{r.target_forwards_per_image:.1f}"),
            ("engine ms/step", lambda r: f"{r.engine_ms_per_step:.2f}"),
            ("host ms/step", lambda r: f"{r.host_ms_per_step:.2f}"),
            ("mean accepted", lambda r: f"{r.mean_accepted_length:.2f}" if r.mean_accepted_length else "-"),
            ("peak mem MiB", lambda r: f"{r.peak_memory_bytes / 2**20:.0f}")]
    if any(r.head_ms_per_step for r in results):  # EAGLE draft heads: their calls, apart from engine and host
        more.insert(5, ("head ms/step", lambda r: f"{r.head_ms_per_step:.2f}" if r.head_ms_per_step else "-"))
    rows += [(name, [cell(r) for r in results]) for name, cell in more]
    rows += quality_rows(results)
    if compare and len(results) > 1:  # ratios against the first config, as rows of the same table
        base = results[0]
        rows.append(("x ms/image vs [1]", [f"{r.image_ms['p50'] / base.image_ms['p50']:.2f}" for r in results]))
        for k in kinds:
            if k in base.steps:
                rows.append((f"x {k} p50 vs [1]", [f"{r.steps[k]['p50_ms'] / base.steps[k]['p50_ms']:.2f}" if k in r.steps
                                                   else "-" for r in results]))
        rows.append(("x fwd/image vs [1]", [f"{r.target_forwards_per_image / base.target_forwards_per_image:.2f}"
                                             for r in results]))
    return rows


def print_table(results: list[ProfileResult], console, compare: bool = False) -> None:
    """One column per config, one row per metric, fitted to the console's width (80 columns when piped):
    compared configs (or labels too wide for their column) are numbered, with a legend below, and configs that do not fit
    go to a further table, so no cell wraps or is cut."""
    from rich.table import Table

    labels = column_labels(results)
    rows = _cells(results, compare)
    metric_w = max(len(m) for m, _ in rows)
    value_w = [max(len(c[i]) for _, c in rows) for i in range(len(results))]
    heads = [f"[{i + 1}]" for i in range(len(results))]
    if not compare and all(len(lb) <= max(w, 12) for lb, w in zip(labels, value_w)):
        heads = labels  # short labels head their columns; otherwise numbered, with a legend
    widths = [max(len(h), w) for h, w in zip(heads, value_w)]
    budget = max(console.width, 40) - (metric_w + 4)  # each further column costs its width + 3 (borders, padding)
    chunks, cur, used = [], [], 0
    for i, w in enumerate(widths):
        if cur and used + w + 3 > budget:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += w + 3
    chunks.append(cur)
    for n, idx in enumerate(chunks):
        t = Table(title="latency profile" + (f" ({n + 1}/{len(chunks)})" if len(chunks) > 1 else ""))
        t.add_column("metric", no_wrap=True, min_width=metric_w)
        for i in idx:
            t.add_column(heads[i], no_wrap=True, justify="right", min_width=widths[i])
        for name, cells in rows:
            t.add_row(name, *[cells[i] for i in idx])
        console.print(t)
    if heads is not labels:  # the legend of the numbered columns
        for i, lb in enumerate(labels):
            console.print(f"[{i + 1}] = {lb}", markup=False, highlight=False, soft_wrap=True)
    for r, lb in zip(results, labels):
        bw = r.bandwidth
        if bw:
            console.print(f"{lb}: a decode step must read {bw['bytes_per_decode_step'] / 2**20:.1f} MiB "
                          f"(weights {bw['weight_bytes'] / 2**20:.1f} + live KV {bw['kv_bytes'] / 2**20:.1f}); measured copy "
                          f"bandwidth {bw['copy_bandwidth_gbps']:.1f} GB/s -> floor {bw['floor_ms']:.3f} ms; decode p50 "
                          f"{bw['decode_p50_ms']:.3f} ms = {bw['decode_p50_ms'] / bw['floor_ms']:.2f}x the floor "
                          f"({100 * bw['fraction_of_floor']:.0f}% of peak)", markup=False, highlight=False, soft_wrap=True)


def plot(results: list[ProfileResult], path: str | os.PathLike) -> None:
    """Two panels: step latency along one generation, and the CDF of step latencies per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from arexport.fileio import atomic_write_png

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r, label in zip(results, column_labels(results)):
        # the decoding loop's steps only: image-decoder (and text-encoder) calls are another kind of work
        ms = [s["ms"] for s in r.trace if s["kind"] not in IMAGE_DECODER_KINDS]
        a.plot(range(len(ms)), ms, marker=".", linewidth=0.8, label=label)
        steps = np.sort(ms)
        if len(steps):
            b.step(steps, np.arange(1, len(steps) + 1) / len(steps), where="post", label=label)
    a.set_xlabel("decoding step in one generation (image decoder calls left out)")
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
    atomic_write_png(path, fig)
