#!/usr/bin/env python
"""Throughput across batch sizes against the read floor (issue 35 item 3), two parts:

    python benchmarks/batch_sweep.py demo --out /tmp/sweep --batches 1,8,32,128
    python benchmarks/batch_sweep.py steps --engine GPT_B_DIR --batches 1,8,32 [--device cuda --backend trt]

`demo`: whole generations on the digits demo engines (built into --out if missing): ar and sjd on
`demo`, arpg on `demo-arpg`, var on `demo-var`, each at every batch size (images; CFG doubles the
rows) through `arexport profile --batch-sweep`'s code (profiling.sweep): step ms, images/s, bytes
read per step, fraction of the read floor, images/s over ar's at the same batch (arpg and var: over the
demo's ar, another model with the same digits, so a cross-model ratio) and where each stops paying.

`steps`: engine steps of a larger engine (GPT-B shapes), where whole generations at 128 images would take
hours on a CPU: per batch, the decode step (q = 1) and the verify step (q = --verify-len) at the image's
mean live length, the bytes each must read and the fraction of the floor, ar's images/s from the decode
step alone (n_tokens steps per image), and the accepted tokens per verify step that speculation needs
to pay (verify ms / decode ms): once that exceeds what the method accepts (sjd on the demo: its measured
forwards per image), it stops paying. Prints markdown tables; --json writes the rows.
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

from arexport.profiling.bandwidth import floor_seconds, mean_live_tokens, measure_copy_bandwidth, step_bytes  # noqa: E402
from arexport.profiling.profiler import RunConfig, profile_generator  # noqa: E402
from arexport.profiling.sweep import parse_batches, run_sweep, sweep_lines, sweep_point  # noqa: E402

DEMO_RUNS = (("demo", "ar", {}), ("demo", "sjd", {}), ("demo-arpg", "arpg", {}), ("demo-var", "var", {}))


def demo(args) -> dict:
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.models.registry import load_model
    from arexport.runtime.generator import Generator
    from arexport.runtime.loading import open_engine

    batches = parse_batches(args.batches)
    out = Path(args.out)
    gens = {}
    for name in dict.fromkeys(n for n, _, _ in DEMO_RUNS):
        d = out / name
        if not (d / "manifest.json").exists():
            print(f"building {d} ...", file=sys.stderr)
            build_engine(load_model(name), d, BuildOptions(batch_sizes=[1, 2 * max(batches)]))
        gens[name] = Generator(open_engine(str(d), args.backend, device=args.device, threads=args.threads))
    bw = measure_copy_bandwidth(args.device)
    configs = [(name, RunConfig(args.backend, method, dict(opts))) for name, method, opts in DEMO_RUNS]

    def run(images, item):
        name, cfg = item
        gen = gens[name]
        sp = gen.sampling_params()
        classes = [i % gen.spec.num_classes for i in range(images)]
        res = profile_generator(gen, cfg, classes, sp, images, args.warmup, args.repeats, None, "fp32")
        row = sweep_point(gen, res, images, sp.uses_cfg, "fp32", bw)
        row.label = f"{name}:{cfg.method}"
        print(f"  {row.label} {images} images: {row.images_per_s:.1f} images/s", file=sys.stderr, flush=True)
        return row

    rows = run_sweep([(b, c) for b in batches for c in configs], run)
    header = (f"digits demo engines, {args.backend} {args.device} fp32, {args.repeats} timed generations per point; copy bandwidth "
              f"{bw / 1e9:.1f} GB/s; {machine()}; commit {git_rev()}")
    print(header)
    print("\n".join(sweep_lines(rows)))
    return {"header": header, "rows": [r.as_dict() for r in rows]}


def _time(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    secs = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        secs.append(time.perf_counter() - t0)
    return statistics.median(secs)


def steps(args) -> dict:
    from arexport.runtime.loading import open_engine

    batches = parse_batches(args.batches)
    eng = open_engine(args.engine, args.backend, device=args.device, threads=args.threads)
    spec = eng.spec
    prec = eng.manifest.precision
    bw = measure_copy_bandwidth(args.device)
    live = int(round(mean_live_tokens(spec)))
    k = min(args.verify_len, eng.max_q)
    rows = []
    for images in batches:
        n = 2 * images  # CFG rows
        cache = eng.allocate(n)
        w = torch.full((n,), live - 1, dtype=torch.long, device=eng.device)
        res = {}
        for q in (1, k):
            tok = torch.zeros(n, q, dtype=torch.long, device=eng.device)
            pos = (live - 1 - spec.cond_len + torch.arange(q, device=eng.device)).expand(n, q)
            mask = cache.causal_mask(w, q)
            res[q] = _time(lambda: eng.step(cache, tok, pos, w, mask), args.warmup, args.iters)
        b = step_bytes(spec, prec, prec, n, live)
        floor = floor_seconds(b.total, bw)
        rows.append({"images": images, "rows": n, "decode ms": round(res[1] * 1e3, 2), f"verify q={k} ms": round(res[k] * 1e3, 2),
                     "MB read/step": round(b.total / 1e6, 1), "floor ms": round(floor * 1e3, 2),
                     "fraction of floor (decode)": round(floor / res[1], 3),
                     "ar images/s (engine)": round(images / (spec.n_tokens * res[1]), 3),
                     "tokens/verify to pay": round(res[k] / res[1], 2)})
        del cache
    header = (f"{spec.name} shapes ({spec.n_layer} layers, dim {spec.dim}, S_max {spec.s_max}), {args.backend} {args.device} "
              f"{prec}, mean live length {live} slots, median of {args.iters} calls; copy bandwidth {bw / 1e9:.1f} GB/s; "
              f"{machine()}; commit {git_rev()}")
    print(header)
    print(markdown_table(rows, list(rows[0])))
    return {"header": header, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["demo", "steps"])
    ap.add_argument("--batches", default="1,8,32,128", help="images per batch (CFG doubles the rows)")
    ap.add_argument("--out", default="/tmp/arexport-sweep", help="demo: where its engines are built")
    ap.add_argument("--engine", help="steps: engine directory (e.g. arexport build GPT-B --random-init --no-images)")
    ap.add_argument("--backend", default="ort")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--verify-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "steps" and not args.engine:
        ap.error("steps needs --engine")
    result = demo(args) if args.part == "demo" else steps(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
