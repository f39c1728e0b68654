#!/usr/bin/env python
"""VAR vs CoDe: forwards per image (drafter and refiner), ms per image and images/s, same run.

    python benchmarks/var_code.py --images 1000                     # the digits demo (torch), with accuracy
    python benchmarks/var_code.py --images 1000 --backend ort       # the demo through ONNX Runtime engines
    python benchmarks/var_code.py --shapes d16 --images 2           # var-d16 shapes, random weights, ORT CPU

The demo's quality is class accuracy under both packaged judges (CNN, MLP) of the decoded images.
`--shapes d16`: the drafter is var-d16 (random weights), the refiner a half-depth VAR of the same
family (depth 8: width 512, 8 heads, the released rule 64 x depth); engines are built under --work once and reused.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import git_rev, machine, markdown_table  # noqa: E402

from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import default_sampling  # noqa: E402


def engines(args):
    """(drafter source, refiner source, backend) for the run."""
    if args.shapes == "demo":
        if args.backend == "torch":
            return "demo-var", "demo-var-small"
        out = []
        for name in ("demo-var", "demo-var-small"):
            out.append(build(name, Path(args.work) / name, {}))
        return tuple(out)
    import torch  # noqa: F401

    ov = {"vae_ch": 32} if args.small_vae else {}
    return (build("var-d16", Path(args.work) / "var-d16", dict(random_init=True, overrides=ov or None)),
            build("var-d16", Path(args.work) / "var-d8", dict(random_init=True, seed=1, overrides={"depth": 8, "dim": 512, "n_head": 8, **ov})))


def build(name, path: Path, kw) -> str:
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.models.registry import load_model

    if not (path / "manifest.json").exists():
        t0 = time.perf_counter()
        build_engine(load_model(name, **kw), path, BuildOptions(batch_sizes=[1, 2, 4, 8, 16]))
        print(f"built {path} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    return str(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--backend", default="torch", choices=["torch", "ort"])
    ap.add_argument("--shapes", default="demo", choices=["demo", "d16"])
    ap.add_argument("--small-vae", action="store_true", help="d16 shapes with a narrow random VQVAE (the VAE is not timed apart)")
    ap.add_argument("--work", default="/tmp/arexport-var-bench")
    args = ap.parse_args()
    if args.shapes == "d16":
        args.backend = "ort"
    drafter, refiner = engines(args)
    classes = [i % 10 for i in range(args.images)]
    rows = []
    gen = Generator.load(drafter, backend=args.backend, draft=refiner)
    params = default_sampling(gen.spec)
    steps = len(gen.spec.extra["patch_nums"])
    runs = [("var", {})] + [("code", {"drafter_steps": n}) for n in sorted({steps - 2, steps - 1, max(1, steps - 3)})]
    for method, opts in runs:
        gen.generate(classes=classes[:1], method=method, method_options=opts, sampling=params, images=False)  # warm-up
        t0 = time.perf_counter()
        r = gen.generate(classes=classes, method=method, method_options=opts, sampling=params, batch_size=args.batch_size,
                         images=args.shapes == "demo", timings=False)
        dt = time.perf_counter() - t0
        row = {"method": method + "".join(f" {k}={v}" for k, v in opts.items()),
               "drafter fwd/img": r.stats["target_forwards_per_image"],
               "refiner fwd/img": r.stats.get("refiner_forwards_per_image", 0.0),
               "ms/image": 1e3 * dt / args.images, "images/s": args.images / dt}
        if args.shapes == "demo":
            from arexport.quality import score_images

            for judge in ("cnn", "mlp"):
                row[f"acc {judge}"] = score_images(r.images, classes, judge).accuracy
        rows.append(row)
        print(row, file=sys.stderr)
    what = "digits demo (demo-var drafter, demo-var-small refiner)" if args.shapes == "demo" else \
        "var-d16 shapes, random weights (refiner: depth 8)"
    print(f"{what}; {args.images} images, batch {args.batch_size}, backend {args.backend}; {machine()}; commit {git_rev()}")
    cols = ["method", "drafter fwd/img", "refiner fwd/img", "ms/image", "images/s"] + (["acc cnn", "acc mlp"] if args.shapes == "demo" else [])
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
