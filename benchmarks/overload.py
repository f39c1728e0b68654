#!/usr/bin/env python
"""Overload with deadlines against `arexport serve` on loopback (issue 38): under 4x its capacity,
how many requests succeed within their deadline, and how fast are the rest refused?

    python benchmarks/overload.py --engine demo --overload 4 --deadline 3 --seconds 20

1. Capacity: `--clients` closed-loop clients send `--images`-image requests (no deadline) for
   `--calibrate-s` seconds; capacity = finished requests per second.
2. Overload: requests arrive open loop, evenly spaced, at `--overload` x capacity for `--seconds`
   seconds, each with `timeout` = `--deadline` in its body (and a client timeout a little above).
   A request *succeeds* when it returns 200 within the deadline; a *refusal* is a 429/503 answer,
   timed from send to answer. Anything else (504, a late 200, a connection error) is a failure.
The server runs in a subprocess (`python -m arexport serve`), so client and server do not share an
interpreter; every request goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import git_rev, machine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    src = ["--model", args.engine] if not Path(args.engine).is_dir() else [args.engine, "--backend", args.backend]
    cmd = [sys.executable, "-m", "arexport", "serve", *src, "--port", str(port), "--max-batch", str(args.max_batch)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("the server exited at start")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


async def capacity(url: str, args) -> float:
    done = 0
    stop = time.perf_counter() + args.calibrate_s

    async def client(c: int, http: httpx.AsyncClient):
        nonlocal done
        i = 0
        while time.perf_counter() < stop:
            body = {"classes": [(c + i + k) % 10 for k in range(args.images)], "seed": 1000 * c + i, "format": "tokens"}
            r = await http.post(f"{url}/generate", json=body, timeout=600)
            if r.status_code == 200 and time.perf_counter() < stop:
                done += 1
            i += 1

    t0 = time.perf_counter()
    async with httpx.AsyncClient() as http:
        await asyncio.gather(*(client(c, http) for c in range(args.clients)))
    return done / (time.perf_counter() - t0)


async def overload(url: str, rate: float, args) -> list[dict]:
    n = max(1, int(rate * args.seconds))
    out: list[dict] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)

    async def one(i: int, http: httpx.AsyncClient):
        body = {"classes": [(i + k) % 10 for k in range(args.images)], "seed": i, "format": "tokens",
                "timeout": args.deadline}
        t0 = time.perf_counter()
        try:
            r = await http.post(f"{url}/generate", json=body, timeout=args.deadline + 30)
            status = r.status_code
        except httpx.HTTPError as e:
            status = type(e).__name__
        out.append({"status": status, "seconds": time.perf_counter() - t0})

    async with httpx.AsyncClient(limits=limits) as http:
        start = time.perf_counter()
        tasks = []
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i, http)))
        await asyncio.gather(*tasks)
    return out


def summarize(rows: list[dict], deadline: float) -> dict:
    ok = [r for r in rows if r["status"] == 200 and r["seconds"] <= deadline]
    refused = [r for r in rows if r["status"] in (429, 503)]
    other = len(rows) - len(ok) - len(refused)
    ref_ms = np.array([r["seconds"] * 1e3 for r in refused]) if refused else np.array([np.nan])
    ok_s = np.array([r["seconds"] for r in ok]) if ok else np.array([np.nan])
    return {"requests": len(rows), "succeeded_within_deadline": len(ok), "refused": len(refused), "other": other,
            "success_fraction": len(ok) / len(rows), "refused_within_100ms": int((ref_ms <= 100).sum()) if refused else 0,
            "refusal_ms_p50": float(np.nanpercentile(ref_ms, 50)), "refusal_ms_p99": float(np.nanpercentile(ref_ms, 99)),
            "refusal_ms_max": float(np.nanmax(ref_ms)), "success_s_p50": float(np.nanpercentile(ok_s, 50)),
            "success_s_max": float(np.nanmax(ok_s)),
            "accepted_success_fraction": len(ok) / max(1, len(rows) - len(refused)),
            "statuses": {k: sum(1 for r in rows if str(r["status"]) == k) for k in sorted({str(r["status"]) for r in rows})}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="demo", help="model name (torch) or engine directory")
    ap.add_argument("--backend", default="ort")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--images", type=int, default=4, help="images per request")
    ap.add_argument("--clients", type=int, default=4, help="closed-loop clients while measuring capacity")
    ap.add_argument("--calibrate-s", type=float, default=10.0)
    ap.add_argument("--overload", type=float, default=4.0)
    ap.add_argument("--deadline", type=float, default=3.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    port = free_port()
    proc = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    try:
        cap = asyncio.run(capacity(url, args))
        rate = args.overload * cap
        rows = asyncio.run(overload(url, rate, args))
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        proc.terminate()
        proc.wait(60)
    res = {"machine": machine(), "git": git_rev(), "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
           "capacity_req_s": cap, "offered_req_s": rate, **summarize(rows, args.deadline),
           "rejected_metrics": [ln for ln in metrics.splitlines() if ln.startswith("arexport_rejected_total")]}
    print(json.dumps(res, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
