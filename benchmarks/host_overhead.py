#!/usr/bin/env python
"""Host work per step for `ar` and `sjd` (adaptive) on an ORT CPU engine at batch 1 (issue 35): wall and
process-CPU ms per step inside engine calls and outside them, ms per image, sjd's speed-up over ar,
torch calls per step (a load-independent count of the runtime's small ops) and a fingerprint of the
tokens (equal fingerprints: the same tokens).

    python benchmarks/host_overhead.py --engine ENGINE_DIR --images 20 --runs 5

To compare two checkouts on a shared machine, run it alternately with PYTHONPATH on each (ratios
within one run; CPU columns are less sensitive to other processes than wall ones).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).parent))
from common import git_rev, machine, markdown_table  # noqa: E402
from host_work import instrument  # noqa: E402

import arexport  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402


class _Calls(TorchFunctionMode):
    """Counts torch function and method calls (attribute reads such as .shape excluded)."""

    def __init__(self):
        super().__init__()
        self.n = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name != "__get__":
            self.n[name] += 1
        return func(*args, **(kwargs or {}))


def torch_calls(gen, acc, method: str, classes) -> float:
    """Torch calls per engine call (prefills included) of one generation."""
    acc.update(w=0.0, c=0.0, n=0)
    with _Calls() as c:
        gen.generate(classes=classes, method=method, batch_size=1, images=False, seed=0)
    return sum(c.n.values()) / acc["n"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", required=True)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--label", default=None, help="name of this checkout in the table (default: its git revision)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's)")
    args = ap.parse_args()
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be at least 1, got {args.threads}")
    gen = Generator.load(args.engine, backend="ort", **({"threads": args.threads} if args.threads is not None else {}))
    acc = instrument(gen)
    classes = [i % 10 for i in range(args.images)]
    methods = ("ar", "sjd")
    for m in methods:
        gen.generate(classes=classes[:2], method=m, batch_size=1, images=False)
    runs = {m: [] for m in methods}
    fp = {}
    for _ in range(args.runs):  # interleaved, so drifting load hits both methods alike
        for m in methods:
            acc.update(w=0.0, c=0.0, n=0)
            w0, c0 = time.perf_counter(), time.process_time()
            res = gen.generate(classes=classes, method=m, batch_size=1, images=False, seed=0)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            n = acc["n"]
            runs[m].append({"ms/image": 1e3 * wall / len(classes), "engine ms/step": 1e3 * acc["w"] / n,
                            "host ms/step": 1e3 * (wall - acc["w"]) / n, "CPU ms/image": 1e3 * cpu / len(classes),
                            "engine CPU ms/step": 1e3 * acc["c"] / n, "host CPU ms/step": 1e3 * (cpu - acc["c"]) / n,
                            "steps/image": n / len(classes)})
            fp[m] = hashlib.sha1(np.ascontiguousarray(res.tokens).tobytes()).hexdigest()[:10]
    rows = []
    for m in methods:
        med = {k: float(np.median([r[k] for r in runs[m]])) for k in runs[m][0]}
        rows.append({"checkout": args.label or git_rev(), "method": m, **med,
                     "torch calls/step": torch_calls(gen, acc, m, classes[:4]), "tokens": fp[m]})
    for r in rows:
        r["x ar (wall)"] = rows[0]["ms/image"] / r["ms/image"]
        r["x ar (CPU)"] = rows[0]["CPU ms/image"] / r["CPU ms/image"]
    print(machine(), "git", git_rev(), "arexport from", Path(arexport.__file__).parent)
    print(f"ORT CPU, batch 1, {args.images} images x {args.runs} runs (median of each column), {args.engine}, "
          f"ORT intra-op threads: {args.threads or 'default'}")
    print(markdown_table(rows, ["checkout", "method", "steps/image", "engine ms/step", "host ms/step", "engine CPU ms/step",
                                "host CPU ms/step", "ms/image", "CPU ms/image", "x ar (wall)", "x ar (CPU)",
                                "torch calls/step", "tokens"]))


if __name__ == "__main__":
    main()
