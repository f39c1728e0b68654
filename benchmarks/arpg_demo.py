#!/usr/bin/env python
"""ARPG on the digits demo: quality and forward passes for steps in {8, 16, 32, 64} next to raster `ar`.

    python benchmarks/arpg_demo.py --images 1000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import QUALITY_COLS, digit_quality, git_rev, machine, markdown_table  # noqa: E402

from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import SamplingParams, default_sampling  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--backend", default="torch")
    args = ap.parse_args()
    classes = [i % 10 for i in range(args.images)]
    rows = []
    runs = [("demo", "ar", {}, None)] + [("demo-arpg", "arpg", {"steps": s}, None) for s in (8, 16, 32, 64)]
    official = SamplingParams(cfg_scale=3.0, cfg_schedule="linear")  # ARPG's own default guidance, temperature 1
    runs += [("demo-arpg", "arpg", {"steps": s}, official) for s in (16, 64)]
    runs += [("demo-arpg", "arpg", {"steps": 16, "schedule": "cosine"}, None)]
    for model, method, opts, params in runs:
        gen = Generator.load(model, backend=args.backend)
        params = params or default_sampling(gen.spec)
        t0 = time.perf_counter()
        r = gen.generate(classes=classes, method=method, method_options=opts, sampling=params, batch_size=100, images=False,
                         timings=False)
        dt = time.perf_counter() - t0
        rows.append({"model": model, "method": method + "".join(f" {k}={v}" for k, v in opts.items()),
                     "sampling": f"cfg {params.cfg_scale} {params.cfg_schedule}, T {params.temperature}"
                                 + (f", top-p {params.top_p}" if params.top_p < 1 else ""),
                     "fwd/img": r.stats["forwards_per_image_alone"], "images/s (batch 100)": args.images / dt,
                     **digit_quality(r.tokens, classes)})
        print(rows[-1], file=sys.stderr)
    print(f"digits demo, {args.images} images, backend {args.backend}; {machine()}; commit {git_rev()}")
    print(markdown_table(rows, ["model", "method", "sampling", "fwd/img", "images/s (batch 100)", *QUALITY_COLS]))


if __name__ == "__main__":
    main()
