#!/usr/bin/env python
"""Host work per step (issue 35, part 2): the runtime's own time between engine calls next to the engine's,
for `ar` and `sjd` (adaptive window) on an ORT CPU engine at batch 1, with ORT's thread pool spinning
(ORT's default, `spin=True`) and not spinning (arexport's default), in one process, interleaved.

    python benchmarks/host_work.py --engine ENGINE_DIR --images 20 --runs 3

Per config: wall ms per step inside engine calls and outside them (the profile's split), the same in
process CPU time (insensitive to other processes on a shared machine; ORT's worker threads count), ms
per image, and sjd's speed-up over ar per image. The median run of `--runs` is reported; tokens of
the two pools are checked equal.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import git_rev, machine, markdown_table  # noqa: E402

from arexport.runtime.generator import Generator  # noqa: E402


def instrument(gen):
    """Wrap the engine's forward to accumulate wall and CPU seconds and calls."""
    eng, acc = gen.engine, {"w": 0.0, "c": 0.0, "n": 0}
    orig = eng._forward

    def timed(*a, **k):
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            return orig(*a, **k)
        finally:
            acc["w"] += time.perf_counter() - w0
            acc["c"] += time.process_time() - c0
            acc["n"] += 1

    eng._forward = timed
    return acc


def measure(gen, acc, method, classes, runs):
    gen.generate(classes=classes[:2], method=method, batch_size=1, images=False)
    out, tokens = [], None
    for _ in range(runs):
        acc.update(w=0.0, c=0.0, n=0)
        w0, c0 = time.perf_counter(), time.process_time()
        res = gen.generate(classes=classes, method=method, batch_size=1, images=False, seed=0)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        n = acc["n"]
        out.append({"ms/image": 1e3 * wall / len(classes), "engine ms/step": 1e3 * acc["w"] / n,
                    "host ms/step": 1e3 * (wall - acc["w"]) / n, "engine CPU ms/step": 1e3 * acc["c"] / n,
                    "host CPU ms/step": 1e3 * (cpu - acc["c"]) / n, "CPU ms/image": 1e3 * cpu / len(classes),
                    "steps/image": n / len(classes)})
        tokens = res.tokens
    med = sorted(out, key=lambda r: r["ms/image"])[len(out) // 2]
    return med, tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", required=True)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    gens = {"spin (ORT default)": Generator.load(args.engine, backend="ort", spin=True),
            "no spin (arexport)": Generator.load(args.engine, backend="ort")}
    accs = {k: instrument(g) for k, g in gens.items()}
    classes = [i % 10 for i in range(args.images)]
    rows, toks = [], {}
    for method in ("ar", "sjd"):
        for pool, gen in gens.items():
            r, toks[pool, method] = measure(gen, accs[pool], method, classes, args.runs)
            rows.append({"pool": pool, "method": method, **r})
    for pool in gens:
        assert np.array_equal(toks[pool, "ar"], toks[next(iter(gens)), "ar"]), "tokens differ between pools"
        ar = next(r for r in rows if r["pool"] == pool and r["method"] == "ar")
        for r in rows:
            if r["pool"] == pool:
                r["x ar (wall)"] = ar["ms/image"] / r["ms/image"]
                r["x ar (CPU)"] = ar["CPU ms/image"] / r["CPU ms/image"]
    print(machine(), "git", git_rev())
    print(f"ORT CPU, batch 1, {args.images} images x {args.runs} runs (median), {args.engine}")
    print(markdown_table(rows, ["pool", "method", "steps/image", "engine ms/step", "host ms/step", "engine CPU ms/step",
                                "host CPU ms/step", "ms/image", "CPU ms/image", "x ar (wall)", "x ar (CPU)"]))


if __name__ == "__main__":
    main()
