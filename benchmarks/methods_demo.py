#!/usr/bin/env python
"""Decoding methods on the digits demo: forward passes, acceptance, wall time and quality.

    python benchmarks/methods_demo.py --images 1000 --json docs/methods_demo.json

Quality uses both packaged judges (CNN and MLP): accuracy of the requested class and Frechet
distance of judge features to held-out real digits. Forward counts are per image on its own
(prefill + the steps it was live in), so they do not depend on batching; wall time per image is
measured at batch 1 on --latency-images images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import QUALITY_COLS, config_label, digit_quality, emit, git_rev, machine  # noqa: E402

from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import SamplingParams  # noqa: E402

DEFAULT_CONFIGS = [
    ("ar", {}),
    ("sjd", {"window": 16}),
    ("sjd", {"window": 16, "init": "repeat_horizon"}),
    ("sd", {"gamma": 4}),
    ("lantern", {"gamma": 4, "delta": 0.1}),
    ("lantern", {"gamma": 4, "delta": 0.3}),
    ("lantern", {"gamma": 4, "delta": 0.3, "rule": "capped"}),
    ("lantern", {"drafter": "sjd", "window": 16, "delta": 0.1}),
    ("zipar", {"window": 2}),
    ("zipar", {"window": 4}),
    ("gsd", {"window": 16}),
]


def run(gen, method, opts, classes, params, seed, batch_size, latency_images):
    res = gen.generate(classes=classes, method=method, method_options=opts, sampling=params, seed=seed,
                       batch_size=batch_size, images=False, timings=False)
    lat_cls = classes[:latency_images]
    t0 = time.perf_counter()
    gen.generate(classes=lat_cls, method=method, method_options=opts, sampling=params, seed=seed + 1, batch_size=1,
                 images=False, timings=False)
    per_image = (time.perf_counter() - t0) / len(lat_cls)
    st = res.stats
    return {
        "method": config_label(method, opts),
        "target fwd/img": st["forwards_per_image_alone"],
        "step compression": 64 / st["forwards_per_image_alone"],
        "mean accepted": st["mean_accepted_length"],
        "draft fwd/img": st["draft_forwards_per_image"],
        "ms/img (batch 1)": per_image * 1e3,
        **digit_quality(res.tokens, classes),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--latency-images", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--engine", default="demo", help="model name (torch) or engine directory")
    ap.add_argument("--draft", default="demo-draft")
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="comma-separated method names to run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--entropy-temperature", action="store_true", help="entropy-aware per-token temperature (ARsample)")
    args = ap.parse_args()
    gen = Generator.load(args.engine, backend=args.backend, draft=args.draft)
    params = SamplingParams(cfg_scale=args.cfg_scale, entropy_temperature=args.entropy_temperature)
    classes = [i % 10 for i in range(args.images)]
    rows = []
    for method, opts in DEFAULT_CONFIGS:
        if args.only and method not in args.only.split(","):
            continue
        rows.append(run(gen, method, opts, classes, params, args.seed, args.batch_size, args.latency_images))
        print(rows[-1], file=sys.stderr)
    header = (f"digits demo, {args.images} images (10 classes), CFG {args.cfg_scale}"
              f"{', entropy-aware temperature' if args.entropy_temperature else ''}, backend {args.backend}; "
              f"{machine()}; commit {git_rev()}")
    cols = ["method", "target fwd/img", "step compression", "mean accepted", "draft fwd/img", "ms/img (batch 1)",
            *QUALITY_COLS]
    emit(header, rows, cols, args.json)


if __name__ == "__main__":
    main()
