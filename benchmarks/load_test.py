#!/usr/bin/env python
"""Bounded load test of `arexport serve` on loopback: images/s and latency vs offered load.

    python benchmarks/load_test.py --engine demo --loads 5,20,60 --requests 60
    python benchmarks/load_test.py --engine /tmp/bench/llamagen-b --backend ort --loads 0.2,1 --requests 8

Starts the HTTP server in this process on 127.0.0.1 (a free port), then sends one-image requests
at a fixed offered rate (open loop, evenly spaced) from a thread pool, for each batching mode.
Every request goes to 127.0.0.1 only; the run stops after --requests requests per point.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import git_rev, machine, markdown_table  # noqa: E402

from arexport.runtime.generator import Generator  # noqa: E402
from arexport.serving.http import create_app  # noqa: E402
from arexport.serving.server import BackgroundServer  # noqa: E402
from arexport.serving.service import GenerationService  # noqa: E402


def run_point(url: str, rate: float, n: int, n_classes: int) -> dict:
    lat, errors = [], []
    lock = threading.Lock()

    def one(i):
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/generate", json={"classes": [i % n_classes], "seed": i, "format": "tokens"}, timeout=600)
        with lock:
            (lat if r.status_code == 200 else errors).append(time.perf_counter() - t0)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(64, n)) as pool:
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, i)
    wall = time.perf_counter() - start
    ms = np.array(lat) * 1e3
    return {"offered req/s": rate, "requests": n, "errors": len(errors), "images/s": len(lat) / wall,
            "p50 ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p99 ms": float(np.percentile(ms, 99)) if len(ms) else float("nan")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="demo", help="model name (torch) or engine directory")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--loads", default="5,20,60", help="offered request rates (one image each)")
    ap.add_argument("--requests", type=int, default=60, help="requests per load point (bounds the run)")
    ap.add_argument("--modes", default="none,continuous")
    ap.add_argument("--max-batch", type=int, default=8)
    args = ap.parse_args()
    gen = Generator.load(args.engine, backend=args.backend)
    rows = []
    for mode in args.modes.split(","):
        svc = GenerationService(gen, batching=mode, max_batch=args.max_batch if mode != "none" else 1)
        app = create_app(svc, max_images=8)
        with BackgroundServer(app) as url:
            httpx.post(f"{url}/generate", json={"classes": [0], "format": "tokens"}, timeout=600)  # warm-up
            for rate in (float(x) for x in args.loads.split(",")):
                row = {"batching": mode, **run_point(url, rate, args.requests, gen.spec.num_classes)}
                rows.append(row)
                print(row, file=sys.stderr)
        svc.close()
    print(f"{gen.spec.name} ({args.backend}), one image per request, max batch {args.max_batch}; {machine()}; commit {git_rev()}")
    print(markdown_table(rows, ["batching", "offered req/s", "requests", "errors", "images/s", "p50 ms", "p99 ms"]))


if __name__ == "__main__":
    main()
