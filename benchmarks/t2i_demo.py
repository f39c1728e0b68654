#!/usr/bin/env python
"""demo-t2i: does the image show the digit the prompt names? Class accuracy under both judges.

    python benchmarks/t2i_demo.py --images 1000 --json docs/t2i_demo.json

Prompts cycle over the classes and over six phrasings: three the model was trained on and three
it never saw (their extra words are unknown to its tokenizer and map to <unk>). Each row generates
`--images` images from prompts with one method at demo-t2i's default sampler (CFG 1.5, T 1, no
top-k) and reports accuracy of the named class and Frechet distance to held-out real digits under
the CNN and the MLP judge; the class-conditional demo (`demo`, class ids instead of prompts, same
sampler) is the reference row. gridar and best-of-n use the digits scorer, which for prompts ranks
candidates by the judge's confidence in its top class (it does not know the prompt's class).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import QUALITY_COLS, config_label, digit_quality, emit, git_rev, machine  # noqa: E402

from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import default_sampling  # noqa: E402

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAINED = ("a handwritten {w}", "the digit {n}", "draw {a} {n}")
UNSEEN = ("can you draw {a} {w} for me", "i want the number {n}", "generate {a} {w}")
CONFIGS = [("ar", {}), ("sjd", {"window": 16}), ("lantern", {"drafter": "sjd", "window": 16, "delta": 0.1}),
           ("gridar", {"candidates": 4}), ("best-of-n", {"candidates": 4})]


def prompts_for(n: int, templates) -> tuple[list[str], list[int]]:
    """n prompts: class i % 10, phrasing (i // 10) % len(templates)."""
    out, cls = [], []
    for i in range(n):
        c, t = i % 10, templates[(i // 10) % len(templates)]
        out.append(t.format(w=WORDS[c], n=c, a="an" if c == 8 else "a"))
        cls.append(c)
    return out, cls


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000, help="images per row (a multiple of 10)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--engine", default="demo-t2i", help="model name (torch) or engine directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="comma-separated method names to run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gen = Generator.load(args.engine, backend=args.backend)
    params = default_sampling(gen.spec)
    rows = []
    ref = Generator.load("demo")
    classes = [i % 10 for i in range(args.images)]
    r = ref.generate(classes=classes, sampling=params, seed=args.seed, batch_size=args.batch_size, images=False, timings=False)
    rows.append({"model": "demo (class ids)", "method": "ar", "prompts": "-", **digit_quality(r.tokens, classes)})
    print(rows[-1], file=sys.stderr)
    for method, opts in CONFIGS:
        if args.only and method not in args.only.split(","):
            continue
        for label, templates in (("trained phrasings", TRAINED), ("unseen phrasings", UNSEEN)):
            prompts, cls = prompts_for(args.images, templates)
            t0 = time.perf_counter()
            r = gen.generate(prompts=prompts, method=method, method_options=opts, sampling=params, seed=args.seed,
                             batch_size=args.batch_size, images=False, timings=False)
            name = config_label(method, opts)
            rows.append({"model": "demo-t2i (prompts)", "method": name, "prompts": label,
                         "target fwd/img": r.stats["forwards_per_image_alone"], "s": time.perf_counter() - t0,
                         **digit_quality(r.tokens, cls)})
            print(rows[-1], file=sys.stderr)
    header = (f"demo-t2i, {args.images} images per row (10 classes), CFG {params.cfg_scale}, backend {args.backend}; "
              f"{machine()}; commit {git_rev()}")
    cols = ["model", "method", "prompts", "target fwd/img", *QUALITY_COLS]
    emit(header, rows, cols, args.json)


if __name__ == "__main__":
    main()
