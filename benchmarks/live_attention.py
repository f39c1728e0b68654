#!/usr/bin/env python
"""Decode-step time against the number of tokens in the cache (issue 35: attention over the live slots).

    python benchmarks/live_attention.py --model GPT-B --random-init --rows 16 --live 64,128,192,256 \
        --engine live=DIR_NEW --engine static=DIR_BUILT_BEFORE_ISSUE_35

Each --engine NAME=DIR is an engine directory (built if DIR does not exist yet, with this checkout);
a directory built before issue 35 takes masks as wide as the cache (`static`), one built since takes
masks narrowed to the live bound. For every engine and every live length, decode steps (q = 1) of
`--rows` rows write slot `live` and see slots [0, live] (the step time does not depend on the cached
values, so the cache is left zero): the median of `--iters` calls after `--warmup`, rounds
interleaved across engines and lengths so load drifts hit all alike; the fastest round counts (on a
shared machine the least disturbed one).
Prints a markdown table with each step time over the step at the largest live length, and the read
floor (weights once + the live K/V of every row, profiling.bandwidth) at the same copy bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, git_rev, machine  # noqa: E402

from arexport.exporter.build import BuildOptions, build_engine  # noqa: E402
from arexport.models.registry import load_model, parse_overrides  # noqa: E402
from arexport.profiling.bandwidth import floor_seconds, measure_copy_bandwidth, step_bytes  # noqa: E402
from arexport.runtime.loading import open_engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="GPT-B")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--model-config", default=None)
    ap.add_argument("--engine", action="append", required=True, help="NAME=DIR (built here when DIR is missing)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--live", default="64,128,192,256", help="tokens in the cache (condition included)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engines = {}
    for item in args.engine:
        name, _, d = item.partition("=")
        if not Path(d, "manifest.json").exists():
            lm = load_model(args.model, random_init=args.random_init, overrides=parse_overrides(args.model_config))
            print(f"building {d} ...", file=sys.stderr)
            build_engine(lm, d, BuildOptions(batch_sizes=[args.rows], verify_len=16, images=False))
        engines[name] = open_engine(d, "ort", threads=args.threads)
    spec = next(iter(engines.values())).spec
    lives = [min(max(int(x), spec.cond_len + 1), spec.cond_len + spec.n_tokens) for x in args.live.split(",")]
    bw = measure_copy_bandwidth("cpu")
    times: dict[tuple, list[float]] = {}
    caches = {name: eng.allocate(args.rows) for name, eng in engines.items()}
    for _ in range(args.rounds):
        for live in lives:
            for name, eng in engines.items():
                cache = caches[name]
                w = torch.full((args.rows,), live - 1, dtype=torch.long)  # the new token is the live-th slot
                tok = torch.zeros(args.rows, 1, dtype=torch.long)
                pos = torch.full((args.rows, 1), live - 1 - spec.cond_len)
                mask = cache.causal_mask(w, 1)
                secs = []
                for i in range(args.warmup + args.iters):
                    t0 = time.perf_counter()
                    eng.step(cache, tok, pos, w, mask)
                    if i >= args.warmup:
                        secs.append(time.perf_counter() - t0)
                times.setdefault((name, live), []).append(statistics.median(secs))
    rows = []
    for name, eng in engines.items():
        for live in lives:
            ms = min(times[(name, live)])
            floor = floor_seconds(step_bytes(spec, "fp32", "fp32", args.rows, live, eng.manifest.spec.extra.get(
                "step_weight_params")).total, bw)
            rows.append({"engine": name, "live masks": eng.live_masks, "tokens in cache": live, "step ms": round(ms * 1e3, 2),
                         f"/ step at {lives[-1]}": round(ms / min(times[(name, lives[-1])]), 3),
                         "floor ms": round(floor * 1e3, 2), "x floor": round(ms / floor, 3)})
    header = (f"{spec.name} shapes ({spec.n_layer} layers, dim {spec.dim}, S_max {spec.s_max}), ORT CPU fp32, "
              f"{args.rows} rows, decode q = 1, best of {args.rounds} rounds of the median of {args.iters} calls; copy bandwidth "
              f"{bw / 1e9:.1f} GB/s; {machine()}; commit {git_rev()}")
    cols = ["engine", "live masks", "tokens in cache", "step ms", f"/ step at {lives[-1]}", "floor ms", "x floor"]
    emit(header, rows, cols, args.json)


if __name__ == "__main__":
    main()
