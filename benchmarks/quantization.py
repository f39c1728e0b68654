#!/usr/bin/env python
"""Quantized engines per mode: size on disk, ORT CPU decode-step latency, gate numbers, demo quality.

    python benchmarks/quantization.py --workdir /tmp/arexport-quant

Builds (or reuses) an fp32 demo engine and a random-init LlamaGen-B engine, quantizes each with
int8 / fp8 / int4-weight (`calibrate_engine`, forced for B: random weights make its gate
meaningless, the numbers are still reported), then times decode steps on ONNX Runtime CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import git_rev, machine, markdown_table, summary_ms, time_calls  # noqa: E402
from step_latency import fill  # noqa: E402

from arexport.calibration.calibrate import calibrate_engine  # noqa: E402
from arexport.exporter.build import BuildOptions, build_engine  # noqa: E402
from arexport.runtime.loading import open_engine  # noqa: E402
from arexport.format.manifest import read_manifest  # noqa: E402
from arexport.models.registry import load_model  # noqa: E402


def dir_mib(d: Path) -> float:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file()) / 2**20


def decode_ms(d: Path, batch: int, offset: int, iters: int) -> float:
    eng = open_engine(str(d), "ort", verify_hashes=False)
    cache = fill(eng, batch, min(offset, eng.spec.n_tokens - 2))
    w = cache.length.clone()
    tok = torch.zeros(batch, 1, dtype=torch.long)
    pos = torch.full((batch, 1), offset)
    mask = cache.causal_mask(w, 1)
    return summary_ms(time_calls(lambda: eng.step(cache, tok, pos, w, mask), 3, iters))["median_ms"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/arexport-quant")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--skip-b", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    models = [("demo", load_model("demo"), 2, 32, 40)]
    if not args.skip_b:
        models.append(("llamagen-b", None, 2, 128, 16))
    rows = []
    for name, lm, batch, offset, samples in models:
        base = work / name
        if not base.exists():
            lm = lm or load_model("GPT-B", random_init=True)
            build_engine(lm, base, BuildOptions(batch_sizes=[batch], verify_len=4, images=name == "demo"))
        rows.append({"model": name, "mode": "fp32", "weights MiB": read_manifest(base).weights["unique_bytes"] / 2**20,
                     "dir MiB": dir_mib(base), "decode ms": decode_ms(base, batch, offset, args.iters)})
        for mode, act in (("int8", "s8"), ("int8", "u8"), ("fp8", "s8"), ("int4-weight", "s8")):
            tag = mode + ("-u8" if act == "u8" else "")
            out = work / f"{name}-{tag}"
            if not out.exists():
                calibrate_engine(base, out, mode, samples=samples, every=4 if name == "demo" else 16, force=name != "demo",
                                 activations=act, report=lambda s: print(s, file=sys.stderr))
            q = read_manifest(out).quantization
            g = q["gates"]
            row = {"model": name, "mode": tag, "weights MiB": q["weights_bytes"] / 2**20, "dir MiB": dir_mib(out),
                   "decode ms": decode_ms(out, batch, offset, args.iters), "top-1 agree": g["top1_agreement"],
                   "mean KL": g["mean_kl"], "gate": "pass" if g["passed"] else "FAIL (forced)"}
            if g.get("demo"):
                row["demo acc ref->q"] = f"{g['demo']['reference']['accuracy']:.3f}->{g['demo']['quantized']['accuracy']:.3f}"
                row["demo FD ref->q"] = f"{g['demo']['reference']['feature_distance']:.1f}->{g['demo']['quantized']['feature_distance']:.1f}"
            rows.append(row)
            print(row, file=sys.stderr)
    print(f"ORT CPU, batch 2 rows; {machine()}; commit {git_rev()}")
    print(markdown_table(rows, ["model", "mode", "weights MiB", "dir MiB", "decode ms", "top-1 agree", "mean KL", "gate",
                                "demo acc ref->q", "demo FD ref->q"]))


if __name__ == "__main__":
    main()
