#!/usr/bin/env python
"""Several devices in one process (issue 34): the CFG row split and data-parallel replicas, measured.

    python benchmarks/multi_device.py --out /tmp/arexport-gpu                       # 2 GPUs: GPT-XL, bf16
    python benchmarks/multi_device.py --smoke --devices cpu,cpu --out /tmp/x        # the demo on CPU "devices"

For each batch of b images (guided: 2b rows): one step's seconds on one device with 2b rows, t(2b),
and with b rows, t(b) (runtime latency curves, q = 1); the same step split (cond rows on the first
device, uncond on the second, runtime/multi_device.py), t_split; the transfer of the b rows' logits
(b x V float32) from the second device to the first, x; and the latency model's prediction
t(b) + x. Then whole images: `ar` per-image seconds on one device and split, with the tokens of
both compared (they must be identical), and the throughput of 2 replicas (serving/replicas.py)
against 1 service on 4 x max_batch concurrent one-image requests. With fewer than 2 CUDA devices
the GPU run is skipped with the reason (written to the JSON), never a failure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent))  # this checkout's arexport, installed or not
from common import git_rev, machine, markdown_table  # noqa: E402

from arexport.runtime import Generator, RowSplitEngine  # noqa: E402
from arexport.runtime.loading import open_engine  # noqa: E402
from arexport.serving.replicas import ReplicaService  # noqa: E402
from arexport.serving.service import GenerationService  # noqa: E402


def skip_reason(devices: list[str]) -> str | None:
    cuda = [d for d in devices if d.startswith("cuda")]
    if cuda and torch.cuda.device_count() < 2:
        return f"needs 2 CUDA devices, torch sees {torch.cuda.device_count()}"
    if len(devices) != 2:
        return f"give exactly 2 devices, got {devices}"
    return None


def transfer_s(n_bytes: int, src: str, dst: str, reps: int = 20) -> float:
    """Median seconds to copy n_bytes of float32 from src to dst (synchronised)."""
    x = torch.zeros(max(1, n_bytes // 4), device=src)
    times = []
    for _ in range(reps + 2):
        for d in (src, dst):
            if d.startswith("cuda"):
                torch.cuda.synchronize(d)
        t0 = time.perf_counter()
        x.to(dst)
        if dst.startswith("cuda"):
            torch.cuda.synchronize(dst)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--devices", default="cuda:0,cuda:1")
    ap.add_argument("--smoke", action="store_true", help="the demo at fp32 (any device)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--max-batch", type=int, default=8)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    devices = args.devices.split(",")
    model, precision = ("demo", "fp32") if args.smoke else ("GPT-XL", "bf16")
    report = {"machine": machine(), "git": git_rev(), "date": time.strftime("%Y-%m-%d %H:%M"), "devices": devices,
              "model": model, "precision": precision, "steps": [], "images": [], "replicas": []}

    def write():
        (out / "multi_device.json").write_text(json.dumps(report, indent=1))
        md = [f"# multi-device ({model} {precision}, {','.join(devices)})", "", report["machine"], ""]
        for key in ("steps", "images", "replicas"):
            if report[key]:
                md += [markdown_table(report[key], list(report[key][0])), ""]
        if "skipped" in report:
            md.append(f"skipped: {report['skipped']}")
        (out / "multi_device.md").write_text("\n".join(md) + "\n")

    why = skip_reason(devices)
    if why:
        report["skipped"] = why
        write()
        print(f"skipped: multi-device ({why})")
        return 0
    kw = {"dtype": precision} | ({} if args.smoke else {"random_init": True})
    one = open_engine(model, device=devices[0], **kw)
    other = open_engine(model, device=devices[1], **kw)
    split = RowSplitEngine([one, other])
    single_gen, split_gen = Generator(one), Generator(split)
    vocab = one.spec.vocab_size
    for b in (int(x) for x in args.batches.split(",")):
        t2b, tb = float(one.latency_curve(2 * b, 1)[0]), float(one.latency_curve(b, 1)[0])
        ts = float(split.latency_curve(2 * b, 1)[0])
        x = transfer_s(b * vocab * 4, devices[1], devices[0])
        report["steps"].append({"images": b, "rows": 2 * b, "t(2b) ms": 1e3 * t2b, "t(b) ms": 1e3 * tb,
                                "split ms": 1e3 * ts, "logits transfer ms": 1e3 * x, "model t(b)+x ms": 1e3 * (tb + x),
                                "fixed cost ms": 1e3 * (ts - tb - x),
                                "split speedup": t2b / ts})
        write()
        classes = list(range(b))
        res = {}
        for name, gen in (("one device", single_gen), ("cfg split", split_gen)):
            gen.generate(classes=classes, method="ar", seed=0, images=False)  # warm-up
            t0 = time.perf_counter()
            r = gen.generate(classes=classes, method="ar", seed=1, images=False)
            res[name] = (time.perf_counter() - t0, r.tokens)
        report["images"].append({"images": b, "one device s/image": res["one device"][0] / b,
                                 "cfg split s/image": res["cfg split"][0] / b,
                                 "tokens identical": bool(np.array_equal(res["one device"][1], res["cfg split"][1]))})
        write()
    n_req = 4 * args.max_batch
    for n_rep in (1, 2):
        def make(d, m):
            return GenerationService(Generator(one if d == devices[0] else other), max_batch=args.max_batch, metrics=m)

        svc = ReplicaService.open(make, devices[:n_rep])
        try:
            [f.result() for f in [svc.submit([i % 10], seed=i, images=False) for i in range(args.max_batch)]]  # warm-up
            t0 = time.perf_counter()
            [f.result() for f in [svc.submit([i % 10], seed=i, images=False) for i in range(n_req)]]
            secs = time.perf_counter() - t0
        finally:
            svc.close()
        report["replicas"].append({"replicas": n_rep, "requests": n_req, "seconds": secs, "images/s": n_req / secs,
                                   "placed": list(svc.placed)})
        write()
    print((out / "multi_device.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
