#!/usr/bin/env python
"""Speculative methods at their DEFAULT options on the digits demo: cost and reproducibility (issue 38).

    python benchmarks/speculative_defaults.py --images 10 --runs 3

Torch backend on the CPU, the demo target with the demo draft, classes 0..images-1, CFG at the
demo's default scale. Per config: median wall ms per image over `--runs` batch-1 runs (seeds
7, 7, ...: the same request repeated), target forwards per image, and token agreement: between the
repeated batch-1 runs (min over runs vs run 0) and between batch 1 and batch `--batch` (same seed).
Agreement 1.0 means the same tokens; anything less is a seed that does not reproduce.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import git_rev, machine, markdown_table  # noqa: E402

from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import default_sampling  # noqa: E402

CONFIGS = [
    ("ar", "ar", {}),
    ("sd", "sd", {}),
    ("lantern (sd)", "lantern", {}),
    ("lantern (sjd)", "lantern", {"drafter": "sjd"}),
    ("vvs uniform", "vvs", {}),
    ("vvs dynamic", "vvs", {"policy": "dynamic"}),
    ("sjd", "sjd", {}),
]


def run(gen, method, options, classes, runs, batch, seed):
    sampling = default_sampling(gen.spec)
    kw = dict(classes=classes, method=method, method_options=options, sampling=sampling, images=False, timings=False)
    gen.generate(**{**kw, "classes": classes[:1]}, batch_size=1, seed=seed)  # warm-up
    times, toks, fwd = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        res = gen.generate(**kw, batch_size=1, seed=seed)
        times.append((time.perf_counter() - t0) / len(classes))
        toks.append(res.tokens)
        fwd.append(res.stats["target_forwards_per_image"])
    batched = gen.generate(**kw, batch_size=batch, seed=seed)
    return {"ms/image": 1e3 * statistics.median(times), "fwd/image": statistics.median(fwd),
            "fwd/image runs": fwd, "fwd/image batch": batched.stats["target_forwards_per_image"],
            "agree runs": min(float((t == toks[0]).mean()) for t in toks),
            "agree batch": float((batched.tokens == toks[0]).mean()),
            "runs ms/image": [round(1e3 * t, 2) for t in times]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--configs", default=None, help="comma-separated config labels (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CLI's default for the demo)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = CONFIGS if args.configs is None else [c for c in CONFIGS if c[0] in args.configs.split(",")]
    gen = Generator.load("demo", draft="demo-draft")
    classes = [i % gen.spec.num_classes for i in range(args.images)]
    rows = [{"config": label, **run(gen, m, o, classes, args.runs, args.batch, args.seed)} for label, m, o in configs]
    print(machine(), "git", git_rev())
    print(f"demo + demo-draft, torch cpu ({args.threads} threads), {args.images} images, seed {args.seed}, {args.runs} batch-1 runs (median), "
          f"batch {args.batch} once")
    print(markdown_table(rows, ["config", "ms/image", "fwd/image", "fwd/image batch", "agree runs", "agree batch",
                                "fwd/image runs", "runs ms/image"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "git": git_rev(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
