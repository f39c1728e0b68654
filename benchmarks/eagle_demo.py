#!/usr/bin/env python
"""EAGLE tree drafting on the digits demo against the chain drafter: forwards, acceptance, time, quality.

    python benchmarks/eagle_demo.py --images 500 --json docs/eagle_demo.json

Rows: ar, sd with demo-draft (chain), eagle with demo-eagle (dynamic and static tree), lantern on the
sd chain and on the eagle trees (the static one is LANTERN++'s setup), vvs on the sd chain and on the
eagle trees (the official setup: skipped rounds feed the head cached target features). On the dynamic
tree a rejection removes x's k + 1 nearest neighbours from the target row itself (the official q = 1
path); with the default k = 1000 on the demo's 17 grey levels that is every other token, so rows with
k = 2 are added. "tokens/target
fwd" is 64 over the target forwards an image took (prefill included); quality is both packaged judges'
accuracy of the requested class and Frechet distance (benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import QUALITY_COLS, emit, git_rev, machine  # noqa: E402
from methods_demo import run  # noqa: E402

from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import SamplingParams  # noqa: E402

HEAD = {"draft_head": "demo-eagle"}
CONFIGS = [
    ("ar", {}),
    ("sd", {"gamma": 4}),
    ("eagle", dict(HEAD, tree="dynamic")),
    ("eagle", dict(HEAD, tree="static")),
    ("lantern", {"gamma": 4, "delta": 0.1}),
    ("lantern", dict(HEAD, tree="dynamic", delta=0.1)),
    ("lantern", dict(HEAD, tree="dynamic", delta=0.1, k=2)),
    ("lantern", dict(HEAD, tree="static", delta=0.1)),
    ("lantern", dict(HEAD, tree="static", delta=0.1, k=2)),
    ("vvs", {"gamma": 4}),
    ("vvs", dict(HEAD, tree="dynamic")),
    ("vvs", dict(HEAD, tree="static")),
    ("vvs", dict(HEAD, tree="static", k=2)),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--latency-images", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help="run only these config numbers (comma-separated, from 0)")
    args = ap.parse_args()
    gen = Generator.load("demo", draft="demo-draft")
    params = SamplingParams(cfg_scale=args.cfg_scale)
    classes = [i % 10 for i in range(args.images)]
    rows = []
    for i, (method, opts) in enumerate(CONFIGS):
        if args.only and str(i) not in args.only.split(","):
            continue
        row = run(gen, method, opts, classes, params, args.seed, args.batch_size, args.latency_images)
        row["tokens/target fwd"] = 64 / row["target fwd/img"]
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    header = (f"digits demo, {args.images} images (10 classes), CFG {args.cfg_scale}, torch; {machine()}; "
              f"commit {git_rev()}")
    cols = ["method", "target fwd/img", "tokens/target fwd", "mean accepted", "draft fwd/img", "ms/img (batch 1)",
            *QUALITY_COLS]
    emit(header, rows, cols, args.json)


if __name__ == "__main__":
    main()
