"""Serving throughput by batching mode for any method, in one process and one run (issue 12).

Requests of one image each arrive open-loop at a fixed rate into a GenerationService (no HTTP, so
the numbers are the scheduler's); every mode sees the same arrival times, seeds and classes.
`continuous` admits images into free slots at every step boundary, `request` merges the requests
queued when the previous group finished, `none` runs them one at a time.

    python benchmarks/serving_batching.py --method sjd --requests 60 --rate 40 --max-batch 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, markdown_table  # noqa: E402

from arexport.runtime.generator import Generator  # noqa: E402
from arexport.serving.service import GenerationService  # noqa: E402


def run(gen, mode: str, method: str, options: dict, n: int, rate: float, max_batch: int) -> dict:
    svc = GenerationService(gen, batching=mode, max_batch=max_batch)
    gen.engine.calls.clear()
    futs, done, t0 = [], {}, time.perf_counter()

    def finished(i):
        return lambda _f: done.__setitem__(i, time.perf_counter())

    try:
        for i in range(n):
            wait = t0 + i / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            sent = time.perf_counter()
            f = svc.submit([i % 10], method=method, options=options, seed=i, images=False)
            f.add_done_callback(finished(i))
            futs.append((sent, f))
        for _, f in futs:
            f.result(timeout=600)
        lat = [done[i] - sent for i, (sent, _) in enumerate(futs)]
        wall = max(done.values()) - t0
    finally:
        svc.close()
    return {"batching": mode, "method": method, "requests": n, "offered req/s": rate, "images/s": n / wall,
            "p50 ms": 1e3 * float(np.percentile(lat, 50)), "p99 ms": 1e3 * float(np.percentile(lat, 99)),
            "engine calls": gen.engine.forward_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help="model name (torch) or engine directory (--backend ort)")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--method", default="sjd")
    ap.add_argument("--option", action="append", default=[], help="method option K=V")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--rate", type=float, default=40.0, help="offered requests per second")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--modes", default="continuous,request,none")
    a = ap.parse_args()
    from arexport.runtime.methods.base import parse_method_options

    gen = Generator.load(a.model, backend=a.backend)
    opts = parse_method_options(a.option)
    gen.generate(classes=[0, 1], method=a.method, method_options=opts, images=False)  # warm-up
    rows = [run(gen, m, a.method, opts, a.requests, a.rate, a.max_batch) for m in a.modes.split(",")]
    print(machine())
    print(markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
