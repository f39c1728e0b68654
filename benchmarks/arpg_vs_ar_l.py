#!/usr/bin/env python
"""Images/s of ARPG (64 steps) vs raster AR on LlamaGen-L-sized random-init shapes, same backend.

    python benchmarks/arpg_vs_ar_l.py --workdir /tmp/arpg-l --batches 1,8

Builds fp32 ORT engines of `arpg-L` and `GPT-L` with random weights (343M parameters each), then
times whole generations (CFG 4.0, so each image is 2 rows) at each batch size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import git_rev, machine, markdown_table  # noqa: E402

from arexport.exporter.build import BuildOptions, build_engine  # noqa: E402
from arexport.models.registry import load_model  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import SamplingParams  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/arpg-l")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--backend", default="ort")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    work = Path(args.workdir)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name, method, opts in (("GPT-L", "ar", {}), ("arpg-L", "arpg", {"steps": 64})):
        d = work / name
        if not d.exists() and args.backend != "torch":
            print(f"building {d}", file=sys.stderr)
            build_engine(load_model(name, random_init=True), d, BuildOptions(batch_sizes=[2 * b for b in batches], images=False))
        src = str(d) if args.backend != "torch" else name
        kw = {} if args.backend != "torch" else {"random_init": True}
        gen = Generator.load(src, backend=args.backend, device=args.device, **kw)
        for b in batches:
            classes = list(range(b))
            gen.generate(classes=classes[:1], method=method, method_options=opts, sampling=SamplingParams(cfg_scale=4.0),
                         batch_size=b, images=False, timings=False)  # warm-up
            t0 = time.perf_counter()
            r = gen.generate(classes=classes, method=method, method_options=opts, sampling=SamplingParams(cfg_scale=4.0),
                             batch_size=b, images=False, timings=False)
            dt = time.perf_counter() - t0
            rows.append({"model": name, "method": method, "batch (images)": b, "fwd/batch": r.stats["target_forwards"],
                         "seconds": dt, "images/s": b / dt})
            print(rows[-1], file=sys.stderr)
    print(f"L shapes (24 layers, dim 1024), random weights, fp32, CFG 4.0, backend {args.backend} on {args.device}; "
          f"{machine()}; commit {git_rev()}")
    print(markdown_table(rows, ["model", "method", "batch (images)", "fwd/batch", "seconds", "images/s"]))


if __name__ == "__main__":
    main()
