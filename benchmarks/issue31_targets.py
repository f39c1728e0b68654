#!/usr/bin/env python
"""Issue 31's targets table: ar, sjd, zipar (window 2 and 4), gsd and entropy-aware sjd on one engine.

    python benchmarks/issue31_targets.py --model demo --images 500 --latency-images 40
    python benchmarks/issue31_targets.py --model GPT-B --images 8 --latency-images 1 --verify-len 24   # random weights

Builds an ONNX engine of --model (the demo's packaged weights; any other model with --random-init
weights, its random VQ codebook included, which GSD's clusters read) with batch sizes 2 and 16 rows
(one and eight CFG images) and --verify-len unless --engine names one, then runs each config on ONNX Runtime (CPU):

* `target fwd/img`: forward passes per image on its own (prefill + the steps it was live in);
* `ms/img b8`: wall clock of generating --images images at batch 8 (continuous batching), per image;
* `ms/img b1`: wall clock of --latency-images images at batch 1, per image (another seed);
* demo only: accuracy and Frechet distance under both packaged digit judges (CNN, MLP), from the
  batch-8 run.

Every config is warmed up once on 2 images. Wall clock is one run on whatever machine this is: the
table says how loaded it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import digit_quality, git_rev, machine, markdown_table  # noqa: E402

from arexport.exporter.build import BuildOptions, build_engine  # noqa: E402
from arexport.models.registry import load_model  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402

CONFIGS = [  # (label, method, options, entropy-aware temperature)
    ("ar", "ar", {}, False),
    ("sjd window=16", "sjd", {"window": 16}, False),
    ("zipar window=2", "zipar", {"window": 2}, False),
    ("zipar window=4", "zipar", {"window": 4}, False),
    ("zipar official window=8", "zipar", {"window": 8}, False),  # grids wider than 8 only
    ("gsd window=16 (sjd drafts)", "gsd", {"window": 16}, False),
    ("sjd window=16, entropy-aware temperature", "sjd", {"window": 16}, True),
]


def timed(gen, method, opts, classes, sampling, seed, batch_size):
    t0 = time.perf_counter()
    res = gen.generate(classes=classes, method=method, method_options=opts, sampling=sampling, seed=seed,
                       batch_size=batch_size, images=False, timings=False)
    return res, (time.perf_counter() - t0) / len(classes)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--engine", default=None, help="an engine directory (default: build --model into a temp dir)")
    ap.add_argument("--images", type=int, default=500, help="images of the batch-8 run (quality on the demo)")
    ap.add_argument("--latency-images", type=int, default=40, help="images of the batch-1 run")
    ap.add_argument("--cfg-scale", type=float, default=None, help="default: the model's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="comma-separated words: run the configs whose label contains one")
    ap.add_argument("--verify-len", type=int, default=16, help="largest step of the engine built (zipar window 2 on a "
                    "16x16 grid needs 22: its cache holds the re-fed row ends past the image)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    engine = args.engine
    if engine is None:
        engine = tempfile.mkdtemp(prefix="issue31-")
        t0 = time.perf_counter()
        build_engine(load_model(args.model, random_init=args.model != "demo"), engine,
                     BuildOptions(batch_sizes=[2, 16], verify_len=args.verify_len, images=False, overwrite=True))
        print(f"# built {args.model} in {time.perf_counter() - t0:.0f} s: {engine}", flush=True)
    gen = Generator.load(engine, backend="ort")
    spec = gen.spec
    sampling = gen.sampling_params(cfg_scale=args.cfg_scale)
    classes = [i % spec.num_classes for i in range(args.images)]
    lat = [i % spec.num_classes for i in range(args.latency_images)]
    rows = []
    for label, method, opts, entropy in CONFIGS:
        if args.only and not any(w in label for w in args.only.split(",")):
            continue
        if method == "zipar" and opts["window"] >= spec.grid_size:
            continue
        sp = dataclasses.replace(sampling, entropy_temperature=True) if entropy else sampling
        timed(gen, method, opts, classes[:2], sp, args.seed + 7, 2)  # warm-up
        res, b8 = timed(gen, method, opts, classes, sp, args.seed, 8)
        _, b1 = timed(gen, method, opts, lat, sp, args.seed + 1, 1)
        st = res.stats
        row = {"method": label, "target fwd/img": st["forwards_per_image_alone"],
               "step compression": spec.n_tokens / st["forwards_per_image_alone"],
               "ms/img b1": b1 * 1e3, "ms/img b8": b8 * 1e3}
        if spec.name == "demo":
            row.update(digit_quality(res.tokens, classes))
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = list(rows[0])
    print(f"# {machine()}; commit {git_rev()}; {spec.name}, ORT CPU, CFG {sampling.cfg_scale}, "
          f"{args.images} images at batch 8, {args.latency_images} at batch 1, seed {args.seed}")
    print(markdown_table(rows, cols))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "commit": git_rev(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
