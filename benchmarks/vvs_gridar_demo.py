#!/usr/bin/env python
"""VVS and GridAR on the digits demo.

    python benchmarks/vvs_gridar_demo.py --images 500

VVS: target and draft forwards per image (batch 1, so skipping decisions are per image) and quality,
next to lantern (delta 0.2, VVS's default) and ar. GridAR N=4 vs best-of-N N=4 and N=8: quality is
judged by the MLP classifier, which the CNN-based verifier and scorer never see; cost is candidate
forwards per image (candidates x tokens) plus verifier calls.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import QUALITY_COLS, digit_quality, git_rev, machine, markdown_table  # noqa: E402

from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import SamplingParams  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--cfg", default="1.5,1.0", help="guidance scales for the GridAR comparison")
    ap.add_argument("--batch", type=int, default=1, help="VVS comparison batch (tokens do not depend on it; ms/img does)")
    ap.add_argument("--no-ar", action="store_true", help="leave ar out of the VVS comparison")
    ap.add_argument("--only", choices=("vvs", "gridar"), default=None, help="run one of the two comparisons")
    args = ap.parse_args()
    gen = Generator.load("demo", draft="demo-draft")
    classes = [i % 10 for i in range(args.images)]
    params = SamplingParams(cfg_scale=1.5)
    vvs_rows, tts_rows = [], []
    for method, opts in () if args.only == "gridar" else (
            ("ar", {}), ("lantern", {"delta": 0.2, "gamma": 4}), ("vvs", {"policy": "uniform", "gamma": 4}),
            ("vvs", {"policy": "dynamic", "gamma": 4}), ("vvs", {"policy": "dynamic", "sim_threshold": 0.95, "gamma": 4})):
        if args.no_ar and method == "ar":
            continue
        t0 = time.perf_counter()
        r = gen.generate(classes=classes, method=method, method_options=opts, sampling=params, batch_size=args.batch, images=False,
                         timings=False, seed=1)
        dt = time.perf_counter() - t0
        vvs_rows.append({"method": method + ("" if not opts else " " + ",".join(f"{k}={v}" for k, v in opts.items())),
                         "target fwd/img": r.stats["forwards_per_image_alone"], "draft fwd/img": r.stats["draft_forwards"] / args.images,
                         "skipped rounds/img": r.stats.get("skipped_rounds", 0) / args.images, "ms/img": 1e3 * dt / args.images,
                         **digit_quality(r.tokens, classes)})
        print(vvs_rows[-1], file=sys.stderr)
    for cfg in () if args.only == "vvs" else (float(x) for x in args.cfg.split(",")):
        p = SamplingParams(cfg_scale=cfg)
        for method, n in (("ar", 1), ("best-of-n", 4), ("best-of-n", 8), ("gridar", 4), ("gridar", 8)):
            opts = {} if method == "ar" else {"candidates": n}
            r = gen.generate(classes=classes, method=method, method_options=opts, sampling=p, batch_size=25, images=False,
                             timings=False, seed=2)
            q = digit_quality(r.tokens, classes)
            tts_rows.append({"cfg": cfg, "method": method if method == "ar" else f"{method} N={n}",
                             "candidate fwd/img": r.stats.get("candidate_forwards_per_image", 64.0),
                             "verifier calls/img": 2 if method == "gridar" else 0,
                             "replaced/img": r.stats.get("gridar_replaced", 0) / args.images,
                             "acc MLP (judge)": q["acc MLP"], "FD MLP": q["FD MLP"], "acc CNN (verifier)": q["acc CNN"]})
            print(tts_rows[-1], file=sys.stderr)
    print(f"digits demo, {args.images} images; {machine()}; commit {git_rev()}")
    print(markdown_table(vvs_rows, ["method", "target fwd/img", "draft fwd/img", "skipped rounds/img", "ms/img", *QUALITY_COLS]))
    print()
    print(markdown_table(tts_rows, ["cfg", "method", "candidate fwd/img", "verifier calls/img", "replaced/img", "acc MLP (judge)",
                                    "FD MLP", "acc CNN (verifier)"]))


if __name__ == "__main__":
    main()
