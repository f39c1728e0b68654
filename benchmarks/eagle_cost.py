#!/usr/bin/env python
"""Issue 30's demo table: EAGLE trees against the chain drafter at equal draft cost, on ONNX Runtime.

    python benchmarks/eagle_cost.py --engine E --draft D --head H --images 1000 --json docs/eagle_cost.json
    (E: `arexport build demo --step tree_verify --out E`; D: `arexport build demo-draft --out D`;
     H: `arexport build-head demo-eagle --model demo --out H`)

Per config, two runs with the same seed:
* quality: --images images (classes cycled) at --batch-size, untimed: both packaged judges' accuracy,
  target forwards per image (prefill included) and tokens per target forward (64 / forwards);
* cost: --latency-images images at batch 1 with step timings on: wall ms per image, the target's engine
  ms (every target step but the image decoder), draft ms (sd/lantern/vvs chains: the draft engine's calls;
  trees: the head's `draft_head` calls) and host ms (the rest: the runtime's own work), all per image;
  draft calls per image (draft model steps or head calls).

Draft cost is compared as draft calls and draft ms per image: the demo's draft model (2 layers, width 64)
and head (1 layer, width 96, plus its fc) cost about the same per token (~0.1 MFLOP multiply-adds), and
on the CPU both are dominated by the call itself, so ms per image is the honest measure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import config_label, digit_quality, git_rev, machine, markdown_table  # noqa: E402

from arexport.runtime.engine import HEAD_RECORD  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import SamplingParams  # noqa: E402

DECODERS = ("vq_decode", "latent_decode")


def configs(head: str) -> list[tuple[str, dict]]:
    h = {"draft_head": head}
    return [
        ("ar", {}),
        ("sd", {"gamma": 4}),
        ("eagle", dict(h, tree="static")),
        ("eagle", dict(h, tree="dynamic")),
        ("lantern", {"gamma": 4}),
        ("lantern", dict(h, tree="static")),  # LANTERN++: static tree, the official k = 1000, delta = 0.1
        ("lantern", dict(h, tree="static", k=1)),
        ("lantern", dict(h, tree="static", k=2)),
        ("vvs", {"gamma": 4}),
        ("vvs", dict(h, tree="static")),
        ("vvs", dict(h, tree="static", k=2)),
    ]


def cost(gen: Generator, method: str, opts: dict, classes: list[int], params: SamplingParams, seed: int) -> dict:
    """Batch-1 timed generation of `classes`: per-image wall, target engine, draft and host ms, draft calls."""
    gen.generate(classes=classes[:1], method=method, method_options=opts, sampling=params, seed=seed, batch_size=1,
                 images=False, timings=False)  # warm-up
    t0 = time.perf_counter()
    res = gen.generate(classes=classes, method=method, method_options=opts, sampling=params, seed=seed, batch_size=1,
                       images=False, timings=True)
    wall = time.perf_counter() - t0
    recs = gen.engine.records
    target = sum(r.seconds for r in recs if r.kind not in DECODERS and r.kind != HEAD_RECORD)
    draft = sum(r.seconds for r in recs if r.kind == HEAD_RECORD)
    draft += sum(r.seconds for r in (gen.draft.records if gen.draft is not None else ()))
    n = len(classes)
    return {"wall ms/img": 1e3 * wall / n, "target ms/img": 1e3 * target / n, "draft ms/img": 1e3 * draft / n,
            "host ms/img": 1e3 * (wall - target - draft) / n, "draft calls/img": res.stats["draft_forwards_per_image"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", required=True, help="demo engine directory built with --step tree_verify")
    ap.add_argument("--draft", required=True, help="demo-draft engine directory")
    ap.add_argument("--head", required=True, help="demo-eagle head directory (arexport build-head) or demo-eagle")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--latency-images", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="run only these config numbers (comma-separated, from 0)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gen = Generator.load(args.engine, backend="ort", draft=args.draft)
    params = SamplingParams(cfg_scale=args.cfg_scale)
    classes = [i % 10 for i in range(args.images)]
    rows = []
    for i, (method, opts) in enumerate(configs(args.head)):
        if args.only and str(i) not in args.only.split(","):
            continue
        res = gen.generate(classes=classes, method=method, method_options=opts, sampling=params, seed=args.seed,
                           batch_size=args.batch_size, images=False, timings=False)
        fwd = res.stats["forwards_per_image_alone"]
        row = {"method": config_label(method, {k: v for k, v in opts.items() if k != "draft_head"}),
               "target fwd/img": fwd, "tokens/fwd": 64 / fwd,
               **cost(gen, method, opts, [c for c in range(10)] * (args.latency_images // 10), params, args.seed + 1),
               **{k: v for k, v in digit_quality(res.tokens, classes).items() if k.startswith("acc")}}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    header = (f"digits demo on ORT (CPU, fp32), CFG {args.cfg_scale}; quality on {args.images} images (batch "
              f"{args.batch_size}), cost on {args.latency_images} images at batch 1; {machine()}; commit {git_rev()}")
    cols = ["method", "target fwd/img", "tokens/fwd", "draft calls/img", "draft ms/img", "target ms/img", "host ms/img",
            "wall ms/img", "acc CNN", "acc MLP"]
    print(header)
    print(markdown_table(rows, cols))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
