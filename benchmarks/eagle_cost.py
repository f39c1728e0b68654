#!/usr/bin/env python
"""Issue 30's demo table: EAGLE trees against the chain drafter at equal draft cost, on ONNX Runtime.

    python benchmarks/eagle_cost.py --engine E --draft D --head H --images 1000 --json docs/eagle_cost.json
    (E: `arexport build demo --step tree_verify --out E`; D: `arexport build demo-draft --out D`;
     H: `arexport build-head demo-eagle --model demo --out H`; all three with --batch-sizes 1,2,4,8,200 for
     --batch-size 100 with CFG; the vvs-on-eagle rows (9, 10) need --verify-len 24 on E and H: a skipped path
     of up to 4 drafts goes in front of the 15-node tree)

Per config, two runs with the same seed:
* quality: --images images (classes cycled) at --batch-size, untimed: both packaged judges' accuracy,
  target forwards per image (prefill included) and tokens per target forward (64 / forwards);
* cost: --latency-images images at batch 1 with step timings on: wall ms per image, the target's engine
  ms (every target step but the image decoder), draft ms (sd/lantern/vvs chains: the draft engine's calls;
  trees: the head's `draft_head` calls) and host ms (the rest: the runtime's own work), all per image;
  draft calls per image (draft model steps or head calls), and the process's CPU ms per image (all its
  threads: on a machine other jobs load, what the run itself consumed, which wall time is not).

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
from common import config_label, digit_quality, emit, git_rev, machine  # noqa: E402

from arexport.runtime.engine import HEAD_RECORD  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.methods.eagle import EagleOptions, load_head  # noqa: E402
from arexport.runtime.sampling import SamplingParams  # noqa: E402

DECODERS = ("vq_decode", "latent_decode")


# LANTERN++ on the demo: a 15-node static tree 6 levels deep (relaxed acceptance takes longer paths than the lossless
# rule, so depth pays) and k = 1 neighbour: the official k = 1000 covers all 16 other grey levels of the demo's
# 17-token vocabulary (the official runs use 5-10 of 16384 codes); delta stays the official 0.1
DEEP_TREE = "0;1;2;0,0;0,1;1,0;0,0,0;0,0,1;0,1,0;0,0,0,0;0,0,0,1;0,0,1,0;0,0,0,0,0;0,0,0,0,1;0,0,0,0,0,0"


def configs(head: str, trees: tuple = (), head_threads=None) -> list[tuple[str, dict]]:
    """Rows 0-10 (the issue's table), then one eagle static row per extra tree (--trees). head_threads goes to
    the eagle rows only (lantern and vvs take the head's default)."""
    h = {"draft_head": head}
    e = h if head_threads is None else dict(h, head_threads=head_threads)
    return [
        ("ar", {}),
        ("sd", {"gamma": 4}),
        ("eagle", dict(e, tree="static")),
        ("eagle", dict(e, tree="dynamic")),
        ("lantern", {"gamma": 4}),  # on the sd chain, the official k = 1000, delta = 0.1
        ("lantern", {"gamma": 4, "k": 1}),
        ("lantern", dict(h, tree="static")),  # LANTERN++ with the official defaults
        ("lantern", dict(h, tree="static", k=1, choices=DEEP_TREE)),  # LANTERN++, the demo setting
        ("vvs", {"gamma": 4}),
        ("vvs", dict(h, tree="static")),
        ("vvs", dict(h, tree="static", k=1)),
    ] + [("eagle", dict(e, tree="static", choices=t)) for t in trees]


class CpuMeter:
    """Process CPU seconds spent inside one object's method (wrapped on the instance, restored by close())."""

    def __init__(self, obj, name: str):
        self.obj, self.name, self.seconds = obj, name, 0.0
        self.own = vars(obj).get(name)  # an instance attribute already there (restored as it was)
        inner = getattr(obj, name)

        def timed(*a, **k):
            c0 = time.process_time()
            try:
                return inner(*a, **k)
            finally:
                self.seconds += time.process_time() - c0

        setattr(obj, name, timed)

    def close(self):
        if self.own is not None:
            setattr(self.obj, self.name, self.own)
        else:
            delattr(self.obj, self.name)


def cost(gen: Generator, method: str, opts: dict, classes: list[int], params: SamplingParams, seed: int) -> dict:
    """Batch-1 timed generation of `classes`: per image wall and CPU ms (whole run; target engine calls; draft
    calls: the draft engine's or the head's), host = the rest, and draft calls."""
    gen.generate(classes=classes[:1], method=method, method_options=opts, sampling=params, seed=seed, batch_size=1,
                 images=False, timings=False)  # warm-up (and the head's one load)
    meters = {"target": CpuMeter(gen.engine, "run")}
    if opts.get("draft_head"):
        meters["draft"] = CpuMeter(load_head(EagleOptions(draft_head=opts["draft_head"], head_threads=opts.get("head_threads")), gen.spec, gen.engine.device),
                                   "step")
    elif gen.draft is not None:
        meters["draft"] = CpuMeter(gen.draft, "run")
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        res = gen.generate(classes=classes, method=method, method_options=opts, sampling=params, seed=seed,
                           batch_size=1, images=False, timings=True)
    finally:
        for m in meters.values():
            m.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    recs = gen.engine.records
    target = sum(r.seconds for r in recs if r.kind not in DECODERS and r.kind != HEAD_RECORD)
    draft = sum(r.seconds for r in recs if r.kind == HEAD_RECORD)
    draft += sum(r.seconds for r in (gen.draft.records if gen.draft is not None else ()))
    n = len(classes)
    tcpu = meters["target"].seconds
    dcpu = meters["draft"].seconds if "draft" in meters and method != "ar" else 0.0
    return {"wall ms/img": 1e3 * wall / n, "target ms/img": 1e3 * target / n, "draft ms/img": 1e3 * draft / n,
            "host ms/img": 1e3 * (wall - target - draft) / n, "CPU ms/img": 1e3 * cpu / n,
            "target CPU ms/img": 1e3 * tcpu / n, "draft CPU ms/img": 1e3 * dcpu / n,
            "host CPU ms/img": 1e3 * (cpu - tcpu - dcpu) / n, "draft calls/img": res.stats["draft_forwards_per_image"]}


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
    ap.add_argument("--trees", default="", help="extra eagle static-tree rows (11, 12, ...): --tree-choices values "
                    "separated by '|'")
    ap.add_argument("--head-threads", type=int, default=None, help="the head rows' head_threads (default: the rule in "
                    "runtime/backends/ort/head.py default_head_threads)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads of the target and draft "
                    "engines (default: ORT's, one per core)")
    args = ap.parse_args()
    gen = Generator.load(args.engine, backend="ort", draft=args.draft,
                         **({"threads": args.threads} if args.threads else {}))
    params = SamplingParams(cfg_scale=args.cfg_scale)
    classes = [i % 10 for i in range(args.images)]
    rows = []
    trees = tuple(t.strip() for t in args.trees.split("|") if t.strip())
    for i, (method, opts) in enumerate(configs(args.head, trees, args.head_threads)):
        if args.only and str(i) not in args.only.split(","):
            continue
        res = gen.generate(classes=classes, method=method, method_options=opts, sampling=params, seed=args.seed,
                           batch_size=args.batch_size, images=False, timings=False)
        fwd = res.stats["forwards_per_image_alone"]
        shown = {k: ("deep15" if v == DEEP_TREE else v) for k, v in opts.items() if k not in ("draft_head", "head_threads")}
        row = {"method": config_label(method, shown),
               "target fwd/img": fwd, "tokens/fwd": 64 / fwd,
               **cost(gen, method, opts, [c for c in range(10)] * (args.latency_images // 10), params, args.seed + 1),
               **{k: v for k, v in digit_quality(res.tokens, classes).items() if k.startswith("acc")}}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    header = (f"digits demo on ORT (CPU, fp32), CFG {args.cfg_scale}; quality on {args.images} images (batch "
              f"{args.batch_size}), cost on {args.latency_images} images at batch 1; {machine()}; commit {git_rev()}")
    cols = ["method", "target fwd/img", "tokens/fwd", "draft calls/img", "draft ms/img", "draft CPU ms/img",
            "target ms/img", "target CPU ms/img", "host ms/img", "host CPU ms/img", "wall ms/img", "CPU ms/img",
            "acc CNN", "acc MLP"]
    emit(header, rows, cols, args.json)


if __name__ == "__main__":
    main()
