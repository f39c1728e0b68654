#!/usr/bin/env python
"""PAR, RandAR, LPD and NAR against raster `ar` and ARPG: demo forwards and accuracy, and L-width ORT CPU wall clock.

    python benchmarks/par_vs_ar.py demo --images 1000
    python benchmarks/par_vs_ar.py shapes --workdir /tmp/par-l --layers 24 [--only GPT-L,RandAR-L]

`demo`: each shipped digits model at its default sampler (demo: ar; demo-par: par; demo-arpg: arpg at
16 steps), seed 0, classes 0..9 in turn: target forwards per image and class accuracy under both judges.
`shapes`: fp32 ORT engines with random weights of LlamaGen-L (`ar`), ARPG-L (`arpg`, 64 steps) and PAR
at L width (par-XL-4x with n_layer/n_head/dim of L, `par`, k = 4) RandAR-L (`randar`, its default 88
steps), LPD-L (`lpd`, its default 20 steps; random order) and NAR-L (`nar`: 31 forwards, one anti-diagonal each;
--layers blocks plus NAR's extra block and below head), 256 tokens (16 x 16) per image, constant CFG 4 (two rows per image), batch 1: forwards and
seconds per image (median of --repeat). Engines are reused from --workdir when present.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import git_rev, machine, markdown_table  # noqa: E402

from arexport.quality import score_digits  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import SamplingParams, default_sampling  # noqa: E402


def demo(args):
    classes = [i % 10 for i in range(args.images)]
    rows = []
    for name, method, opts in (("demo", "ar", {}), ("demo-par", "par", {}), ("demo-arpg", "arpg", {"steps": 16}),
                               ("demo-arpg", "arpg", {"steps": 64})):
        gen = Generator.load(name)
        t0 = time.perf_counter()
        r = gen.generate(classes=classes, method=method, method_options=opts, sampling=default_sampling(gen.spec),
                         batch_size=min(500, args.images), images=False, timings=False, seed=0)
        dt = time.perf_counter() - t0
        cnn, mlp = (score_digits(r.tokens, classes, j) for j in ("cnn", "mlp"))
        rows.append({"model": name, "method": method + (f" {opts['steps']} steps" if opts else ""),
                     "fwd/image": r.stats["target_forwards_per_image"], "acc cnn": cnn.accuracy, "acc mlp": mlp.accuracy,
                     "fd cnn": cnn.feature_distance, "fd mlp": mlp.feature_distance, "seconds": dt})
        print(rows[-1], file=sys.stderr, flush=True)
    print(f"digits demos at their default samplers, {args.images} images, seed 0; {machine()}; commit {git_rev()}")
    print(markdown_table(rows, list(rows[0])))


def shapes(args):
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.models.registry import load_model

    L = {"n_layer": args.layers, "n_head": 16, "dim": 1024}
    work = Path(args.workdir)
    rows = []
    for name, model, over, method, opts in (("GPT-L", "GPT-L", {}, "ar", {}),
                                           ("arpg-L", "arpg-L", {}, "arpg", {"steps": 64}),
                                           ("PAR-L-4x", "par-XL-4x", {}, "par", {}),
                                           ("RandAR-L", "randar-L", {}, "randar", {}),
                                           ("LPD-L", "lpd-l-256", {}, "lpd", {}),
                                           ("NAR-L", "nar-L", {}, "nar", {})):
        if args.only and name not in args.only.split(","):
            continue
        d = work / name
        if not d.exists():
            print(f"building {d}", file=sys.stderr, flush=True)
            lm = load_model(model, random_init=True, overrides={**L, **over}, image_size=256)
            build_engine(lm, d, BuildOptions(batch_sizes=[2], images=False))
            del lm
        if args.build_only:
            continue
        gen = Generator.load(str(d), backend="ort")
        p = SamplingParams(cfg_scale=4.0)
        gen.generate(classes=[1], method=method, method_options=opts, sampling=p, images=False, timings=False)  # warm-up
        secs, loads = [], [os.getloadavg()[0]]
        for i in range(args.repeat):
            t0 = time.perf_counter()
            r = gen.generate(classes=[i], method=method, method_options=opts, sampling=p, images=False, timings=False)
            secs.append(time.perf_counter() - t0)
            loads.append(os.getloadavg()[0])
        rows.append({"model": name, "method": method, "fwd/image": r.stats["target_forwards_per_image"],
                     "s/image (median)": statistics.median(secs), "s/image (min)": min(secs),
                     "s/image (all)": " ".join(f"{s:.2f}" for s in secs),
                     "load (1-min, before/after each)": " ".join(f"{x:.1f}" for x in loads)})
        print(rows[-1], file=sys.stderr, flush=True)
    if not rows:
        return
    print(f"L width (n_head 16, dim 1024), {args.layers} layers, random weights, fp32 ORT CPU, 256 tokens, CFG 4, batch 1; "
          f"{machine()}; commit {git_rev()}")
    print(markdown_table(rows, list(rows[0])))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["demo", "shapes"])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--workdir", default="/tmp/par-l")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="", help="shapes: comma-separated model rows to run (default all)")
    ap.add_argument("--build-only", action="store_true", help="shapes: build the missing engines, time nothing")
    args = ap.parse_args()
    demo(args) if args.what == "demo" else shapes(args)


if __name__ == "__main__":
    main()
