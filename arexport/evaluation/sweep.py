"""A methods x options sweep: generate the same conditions with each config, time it, score the images,
and write one speed/quality table (JSON + markdown) and a Pareto plot (ms per image vs FID)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from arexport.errors import ArexportError
from arexport.evaluation.features import FeatureNet, extract
from arexport.evaluation.metrics import Reference, evaluate
from arexport.runtime.methods.base import parse_method_options

MAX_CONFIGS = 64


@dataclass
class SweepConfig:
    """One method with its options: 'sjd:window=8;init=random'."""

    method: str
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.method + (f"[{','.join(f'{k}={v}' for k, v in self.options.items())}]" if self.options else "")

    @classmethod
    def parse_list(cls, text: str) -> list["SweepConfig"]:
        """'ar,sjd,sjd:window=8;init=random' -> configs (at most MAX_CONFIGS)."""
        out = []
        for item in (t.strip() for t in text.split(",")):
            if not item:
                continue
            method, _, opts = item.partition(":")
            out.append(cls(method.strip(), parse_method_options(opts.split(";"), "--sweep option") if opts else {}))
        if not out:
            raise ArexportError("--sweep is empty: give methods like ar,sjd,sjd:window=8")
        if len(out) > MAX_CONFIGS:
            raise ArexportError(f"--sweep has {len(out)} configs, over the limit of {MAX_CONFIGS}")
        return out


def run_sweep(gen, configs: list[SweepConfig], classes: list[int], net: FeatureNet, ref: Reference, *, sampling=None,
              batch_size: int = 8, seed: int = 0, k: int = 5, warmup: bool = True, log=None) -> list[dict[str, Any]]:
    """One row per config: timing (ms/image, images/s, target forwards/image) and the metrics of its images.
    Every config decodes the same classes with the same seed; the timed run includes the image decoder."""
    from arexport.quality import score_images

    for cfg in configs:  # every config checked before the first image is generated
        gen.method(cfg.method, cfg.options)
    rows = []
    for cfg in configs:
        if log:
            log(f"sweep: {cfg.label} ({len(classes)} images)")
        if warmup:  # compile/allocate outside the timing
            gen.generate(classes=classes[:batch_size], method=cfg.method, method_options=cfg.options, sampling=sampling,
                         batch_size=batch_size, images=True, timings=False, seed=seed)
        t0 = time.perf_counter()
        res = gen.generate(classes=classes, method=cfg.method, method_options=cfg.options, sampling=sampling,
                           batch_size=batch_size, images=True, timings=False, seed=seed)
        seconds = time.perf_counter() - t0
        if res.images is None:
            raise ArexportError(f"{cfg.label}: the engine has no image decoder, so there are no images to evaluate")
        feats, logits = extract(net, np.asarray(res.images))
        m = evaluate(feats, logits, ref, net.name, k)
        row = {"config": cfg.label, "method": cfg.method, "options": cfg.options, "images": len(classes),
               "seconds": seconds, "ms_per_image": 1e3 * seconds / len(classes), "images_per_s": len(classes) / seconds,
               "target_forwards_per_image": res.stats.get("target_forwards_per_image"), **m.as_dict()}
        if net.name in ("cnn", "mlp"):  # the demo judge's class accuracy beside the distances
            row["class_accuracy"] = score_images(res.images, classes, net.name).accuracy
        rows.append(row)
    return rows


def pareto_front(rows: list[dict], x: str = "ms_per_image", y: str = "fid") -> list[int]:
    """Indices of the rows no other row beats on both x and y (lower is better for both)."""
    front = []
    for i, r in enumerate(rows):
        dominated = any(o[x] <= r[x] and o[y] <= r[y] and (o[x] < r[x] or o[y] < r[y]) for j, o in enumerate(rows) if j != i)
        if not dominated:
            front.append(i)
    return front


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict], context: dict) -> str:
    """The speed/quality table: one line per config, Pareto-optimal ones marked."""
    front = set(pareto_front(rows))
    lines = [f"Sweep of {context.get('model', '?')} ({context.get('backend', '?')}, {context.get('device', '?')}), "
             f"{rows[0]['images'] if rows else 0} images per config, features {context.get('feature_net', '?')}, "
             f"reference {context.get('reference', '?')}.", "",
             "| config | ms/image | images/s | fwd/image | FID | precision | recall | IS | accuracy | Pareto |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for i, r in enumerate(rows):
        lines.append(f"| {r['config']} | {r['ms_per_image']:.1f} | {r['images_per_s']:.2f} | "
                     f"{_fmt(r['target_forwards_per_image'], '.1f')} | {r['fid']:.3f} | {_fmt(r['precision'], '.3f')} | "
                     f"{_fmt(r['recall'], '.3f')} | {_fmt(r['inception_score'], '.2f')} | {_fmt(r.get('class_accuracy'), '.3f')} | "
                     f"{'*' if i in front else ''} |")
    return "\n".join(lines) + "\n"


def plot_pareto(rows: list[dict], path: str | Path) -> Optional[str]:
    """ms/image vs FID, one point per config, the Pareto front joined. Returns why not, if matplotlib is absent."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install 'arexport[plot]'): no Pareto plot"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from arexport.fileio import atomic_write_png

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["ms_per_image"], r["fid"], s=25)
        ax.annotate(r["config"], (r["ms_per_image"], r["fid"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted((rows[i] for i in pareto_front(rows)), key=lambda r: r["ms_per_image"])
    ax.plot([r["ms_per_image"] for r in front], [r["fid"] for r in front], linewidth=1, alpha=0.6, label="Pareto front")
    ax.set_xlabel("ms per image (wall clock, image decoder included)")
    ax.set_ylabel("FID (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_png(path, fig)
    return None
