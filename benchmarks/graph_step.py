#!/usr/bin/env python
"""Node count and latency of engines' step graphs alone, side by side (issue 19: nodes per step).

    python benchmarks/graph_step.py ENGINE_DIR [ENGINE_DIR ...] --rows 2 --q 1,16

Runs each engine's step graph through an ONNX Runtime session on zero inputs (no runtime around
it), `--rounds` times in turn, each round a median of `--calls` calls after a warm-up; prints the
median of the round medians per engine and query length, and the graph's node count by operator.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from arexport.calibration.quantize import input_dtypes  # noqa: E402


def feeds(session: ort.InferenceSession, dtypes: dict, rows: int, q: int) -> dict[str, np.ndarray]:
    """Zero caches (in the graph's cache dtype), tokens 0, q positions after slot 20, all-visible
    mask (the shapes the graph declares)."""
    shapes = {i.name: i.shape for i in session.get_inputs()}
    out = {"tokens": np.zeros((rows, q), np.int64), "positions": np.tile(np.arange(20, 20 + q), (rows, 1)),
           "write_index": np.full((rows,), 20, np.int64),
           "attn_mask": np.ones((rows, 1, q, shapes["attn_mask"][-1]), bool)}
    for name, shape in shapes.items():
        if name.startswith("past_"):
            out[name] = np.zeros((rows,) + tuple(shape[1:]), dtypes[name])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines", nargs="+")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--q", default="1,16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    ort.set_default_logger_severity(3)  # feeding numpy copies the caches, which ORT warns about per call
    print(machine())
    sessions, dtypes = {}, {}
    for d in args.engines:
        path = str(Path(d) / "model.onnx")
        dtypes[d] = input_dtypes(Path(path))
        nodes = collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)
        print(f"{d}: {sum(nodes.values())} nodes; " + ", ".join(f"{k} {v}" for k, v in nodes.most_common()))
        sessions[d] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for q in (int(x) for x in args.q.split(",")):
        rounds = {d: [] for d in sessions}
        for _ in range(args.rounds):
            for d, s in sessions.items():
                f = feeds(s, dtypes[d], args.rows, q)
                for _ in range(30):
                    s.run(["logits"], f)
                times = []
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    s.run(["logits"], f)
                    times.append(time.perf_counter() - t0)
                rounds[d].append(statistics.median(times) * 1e6)
        for d, xs in rounds.items():
            print(f"q={q} {d}: {statistics.median(xs):.1f} us (round medians {', '.join(f'{x:.0f}' for x in xs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
