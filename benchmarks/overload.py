#!/usr/bin/env python
"""Overload with deadlines against `arexport serve` on loopback (issue 38): how many requests succeed
within their deadline, how fast are the rest refused?

    python benchmarks/overload.py --engine demo --overload 4 --deadline 3 --requests 200

What "k x overload" means here, measured first by the script:
1. Capacity C: enough closed-loop clients to keep the batch full (`--clients`, default 2 batches'
   worth) send `--images`-image requests without a deadline for `--calibrate-s` seconds; C = requests
   finished per second after the first `--warmup-s`. N_D = C x deadline: the requests the server
   finishes within one deadline at steady state.
2. Sustained phase: `--requests` requests (default k x C x `--seconds`) arrive open loop, evenly
   spaced, at k x C per second, each with `timeout` = `--deadline` in its body (the client waits a
   little longer). The server can finish C x (arrival window) = requests / k of them in that time.
3. Burst phase: k x N_D requests sent at once (the issue's "100 concurrent requests" shape), each
   on its own connection by a minimal asyncio HTTP/1.1 client (`--httpx-burst`: httpx, whose own
   CPU per request is then part of every time); the server can finish N_D of them within the deadline.
4. Busy burst: the same burst while `--clients` closed-loop clients (no deadline) keep the batch
   full, so refusals are decided while the worker competes for the interpreter; only its refusal
   times are meant (its "deliverable" is 0: the closed-loop work takes the capacity).
A request *succeeds* when it returns 200 within the deadline; a *refusal* is a 429/503 answer, timed
from send to answer by the client, and by the server from the request reaching its HTTP guard to the
refusal (its `Server-Timing: decision;dur=MS` header: what client-side load and the event loop's
queue of not-yet-parsed requests add is the difference); anything else (504, a late 200, a
connection error) is a failure.

The arithmetic: in any window W the server finishes at most C x W requests while k x C x W arrive,
so at most 1/k of the offered requests can succeed, whatever admission does (25% at 4x). The issue's
"70% succeed" therefore cannot hold at 4x as a share of *offered* requests; the script reports it
and the share of *capacity* delivered as on-time successes (succeeded / (requests / k)), which is
what admission control decides: >= 70% of capacity delivered on time, every refusal within 100 ms,
no accepted request late.
The server runs in a subprocess (`python -m arexport serve`), so client and server do not share an
interpreter; every request goes to 127.0.0.1 only. One summary table is printed (and `--json`).
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
from typing import Optional

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
    """Requests finished per second by closed-loop clients without deadlines, after a warm-up."""
    done = 0
    t0 = time.perf_counter()
    begin, stop = t0 + args.warmup_s, t0 + args.warmup_s + args.calibrate_s

    async def client(c: int, http: httpx.AsyncClient):
        nonlocal done
        i = 0
        while time.perf_counter() < stop:
            body = {"classes": [(c + i + k) % 10 for k in range(args.images)], "seed": 1000 * c + i, "format": "tokens"}
            r = await http.post(f"{url}/generate", json=body, timeout=600)
            if r.status_code == 200 and begin <= time.perf_counter() < stop:
                done += 1
            i += 1

    async with httpx.AsyncClient() as http:
        await asyncio.gather(*(client(c, http) for c in range(args.clients)))
    return done / args.calibrate_s


async def offer(url: str, n: int, rate: Optional[float], args, seed0: int) -> list[dict]:
    """n requests with deadlines, evenly spaced at `rate` per second (None: all at once)."""
    out: list[dict] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)

    async def one(i: int, http: httpx.AsyncClient):
        body = {"classes": [(i + k) % 10 for k in range(args.images)], "seed": seed0 + i, "format": "tokens",
                "timeout": args.deadline}
        t0 = time.perf_counter()
        try:
            r = await http.post(f"{url}/generate", json=body, timeout=args.deadline + 30)
            status = r.status_code
            decision = server_decision_ms(r.headers.get("server-timing"))
        except httpx.HTTPError as e:
            status, decision = type(e).__name__, None
        out.append({"status": status, "seconds": time.perf_counter() - t0, "decision_ms": decision})

    async with httpx.AsyncClient(limits=limits) as http:
        await http.get(f"{url}/healthz", timeout=30)  # the client's own set-up is not timed as a refusal
        start = time.perf_counter()
        tasks = []
        for i in range(n):
            delay = (start + i / rate - time.perf_counter()) if rate else 0.0
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i, http)))
        await asyncio.gather(*tasks)
    return out


def server_decision_ms(header: Optional[str]) -> Optional[float]:
    """The server's own time to refuse (`Server-Timing: decision;dur=MS`, set on 429/503), or None."""
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";")
        if name == "decision" and rest.startswith("dur="):
            try:
                return float(rest[4:])
            except ValueError:
                return None
    return None


async def raw_post(port: int, path: str, body: bytes, timeout: float) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 POST on a fresh loopback connection with asyncio streams: (status, headers, body).
    The burst phase uses it so that the client's own HTTP library (httpx costs several ms of CPU per
    request on a loaded 2-core machine) is not timed as the server's refusal."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        data = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), timeout)
        return int(lines[0].split()[1]), headers, data
    finally:
        writer.close()


async def offer_raw(port: int, n: int, args, seed0: int) -> list[dict]:
    """n requests with deadlines sent at once, each on its own connection (raw_post)."""
    bodies = [json.dumps({"classes": [(i + k) % 10 for k in range(args.images)], "seed": seed0 + i, "format": "tokens",
                          "timeout": args.deadline}).encode() for i in range(n)]
    out: list[dict] = []

    async def one(body: bytes):
        t0 = time.perf_counter()
        try:
            status, headers, _ = await raw_post(port, "/generate", body, args.deadline + 30)
            decision = server_decision_ms(headers.get("server-timing"))
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            status, decision = type(e).__name__, None
        out.append({"status": status, "seconds": time.perf_counter() - t0, "decision_ms": decision})

    await asyncio.gather(*(one(b) for b in bodies))
    return out


async def busy_burst(url: str, port: int, n: int, args) -> list[dict]:
    """The burst (offer_raw) sent while `--clients` closed-loop clients without deadlines keep the
    batch full: the refusals are decided while the worker competes for the interpreter."""
    stop = asyncio.Event()

    async def client(c: int, http: httpx.AsyncClient):
        i = 0
        while not stop.is_set():
            body = {"classes": [(c + i + k) % 10 for k in range(args.images)], "seed": 5000 * c + i, "format": "tokens"}
            await http.post(f"{url}/generate", json=body, timeout=600)
            i += 1

    async with httpx.AsyncClient() as http:
        tasks = [asyncio.ensure_future(client(c, http)) for c in range(args.clients)]
        await asyncio.sleep(2.0)  # the batch fills
        rows = await offer_raw(port, n, args, 2 * 10**6)
        stop.set()
        await asyncio.gather(*tasks)
    return rows


def summarize(rows: list[dict], deadline: float, deliverable: float) -> dict:
    """Counts and timings of one phase; `deliverable`: the requests capacity could finish in it."""
    ok = [r for r in rows if r["status"] == 200 and r["seconds"] <= deadline]
    refused = [r for r in rows if r["status"] in (429, 503)]
    other = len(rows) - len(ok) - len(refused)
    ref_ms = np.array([r["seconds"] * 1e3 for r in refused]) if refused else np.array([np.nan])
    ok_s = np.array([r["seconds"] for r in ok]) if ok else np.array([np.nan])
    dec = np.array([r["decision_ms"] for r in refused if r.get("decision_ms") is not None] or [np.nan])
    return {"requests": len(rows), "deliverable": deliverable, "succeeded": len(ok), "refused": len(refused),
            "other": other, "success_of_offered": len(ok) / len(rows), "success_of_capacity": len(ok) / deliverable if deliverable > 0 else float("nan"),
            "refused_within_100ms": int((ref_ms <= 100).sum()) if refused else 0,
            "refusal_ms_p50": float(np.nanpercentile(ref_ms, 50)), "refusal_ms_p99": float(np.nanpercentile(ref_ms, 99)),
            "refusal_ms_max": float(np.nanmax(ref_ms)),
            "server_decision_ms_p50": float(np.nanpercentile(dec, 50)), "server_decision_ms_p99": float(np.nanpercentile(dec, 99)),
            "success_s_p50": float(np.nanpercentile(ok_s, 50)),
            "success_s_max": float(np.nanmax(ok_s)),
            "accepted_on_time": len(ok) / max(1, len(rows) - len(refused)),
            "statuses": {k: sum(1 for r in rows if str(r["status"]) == k) for k in sorted({str(r["status"]) for r in rows})}}


def table(res: dict) -> str:
    cols = ["phase", "offered", "offered req/s", "deliverable", "succeeded", "% of offered", "% of capacity",
            "refused", "refused <=100 ms", "refusal ms p50/p99/max", "server decision ms p50/p99", "other", "success s p50/max"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name in ("sustained", "burst", "burst_busy"):
        p = res.get(name)
        if not p:
            continue
        rate = "at once" if p["offered_req_s"] is None else f"{p['offered_req_s']:.2f}"
        lines.append(f"| {name} | {p['requests']} | {rate} | {p['deliverable']:.1f} | {p['succeeded']} | "
                     f"{100 * p['success_of_offered']:.0f}% | {100 * p['success_of_capacity']:.0f}% | {p['refused']} | "
                     f"{p['refused_within_100ms']} | {p['refusal_ms_p50']:.0f}/{p['refusal_ms_p99']:.0f}/{p['refusal_ms_max']:.0f} | "
                     f"{p['server_decision_ms_p50']:.1f}/{p['server_decision_ms_p99']:.1f} | "
                     f"{p['other']} | {p['success_s_p50']:.2f}/{p['success_s_max']:.2f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="demo", help="model name (torch) or engine directory")
    ap.add_argument("--backend", default="ort")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--images", type=int, default=4, help="images per request")
    ap.add_argument("--clients", type=int, default=None, help="closed-loop clients while measuring capacity "
                    "(default: two batches' worth of images outstanding)")
    ap.add_argument("--warmup-s", type=float, default=3.0)
    ap.add_argument("--calibrate-s", type=float, default=10.0)
    ap.add_argument("--overload", type=float, default=4.0, help="k: offered load over measured capacity")
    ap.add_argument("--deadline", type=float, default=3.0, help="each request's timeout, seconds")
    ap.add_argument("--requests", type=int, default=None, help="requests in the sustained phase (default: k x C x --seconds)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--no-burst", action="store_true", help="skip the burst phase")
    ap.add_argument("--httpx-burst", action="store_true", help="send the burst with httpx (as before) instead of raw "
                    "asyncio sockets: the refusal times then include httpx's own per-request CPU")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    if args.clients is None:
        args.clients = max(1, -(-2 * args.max_batch // args.images))
    port = free_port()
    proc = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    res = {"machine": machine(), "git": git_rev(), "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args)}
    try:
        cap = asyncio.run(capacity(url, args))
        if cap <= 0:
            raise SystemExit("no request finished while measuring capacity: raise --calibrate-s")
        rate = args.overload * cap
        n = args.requests or max(1, round(rate * args.seconds))
        res.update(capacity_req_s=cap, per_deadline=cap * args.deadline)
        rows = asyncio.run(offer(url, n, rate, args, 0))
        res["sustained"] = {"offered_req_s": rate, **summarize(rows, args.deadline, n / args.overload)}
        if not args.no_burst:
            time.sleep(args.deadline + 1)  # let the sustained phase's accepted work drain
            m = max(1, round(args.overload * cap * args.deadline))
            rows = asyncio.run(offer(url, m, None, args, 10**6) if args.httpx_burst else offer_raw(port, m, args, 10**6))
            res["burst"] = {"offered_req_s": None, "client": "httpx" if args.httpx_burst else "raw asyncio sockets",
                            **summarize(rows, args.deadline, cap * args.deadline)}
            time.sleep(args.deadline + 1)
            rows = asyncio.run(busy_burst(url, port, m, args))
            res["burst_busy"] = {"offered_req_s": None, "client": "raw asyncio sockets, beside closed-loop load",
                                 **summarize(rows, args.deadline, 0.0)}
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        proc.terminate()
        proc.wait(60)
    res["rejected_metrics"] = [ln for ln in metrics.splitlines() if ln.startswith("arexport_rejected_total")]
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"{res['machine']}; git {res['git']}; {res['date']}")
    print(f"capacity C = {cap:.2f} requests/s of {args.images} images (max batch {args.max_batch}, {args.clients} "
          f"closed-loop clients); N_D = C x {args.deadline:g} s = {cap * args.deadline:.1f}; overload k = {args.overload:g}: "
          f"at most {100 / args.overload:.0f}% of offered requests can succeed (deliverable = what C finishes in the phase)")
    print(table(res))
    print("; ".join(res["rejected_metrics"]))


if __name__ == "__main__":
    main()
