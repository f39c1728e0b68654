#!/usr/bin/env python
"""Where an ORT decode step's time goes (issue 19, part 2), and how far it is from the memory floor.

    python benchmarks/ort_ops.py --model GPT-B --batch 2 --json /tmp/ops.json

Builds (or reuses --engine DIR) a random-weight engine, fills the cache to --offset tokens, times
decode steps through the runtime (IOBinding, in-place cache), then reruns them under ONNX Runtime's
profiler and sums kernel time per operator type and per group (MatMul, attention, norms, rotary and
glue). The floor is the bytes a decode step must read over two bandwidths measured in the same run:
a pure read (a large reduction) and STREAM-style copy (read + written bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, markdown_table  # noqa: E402
from step_latency import fill  # noqa: E402

from arexport.exporter.build import BuildOptions, build_engine  # noqa: E402
from arexport.models.registry import load_model  # noqa: E402
from arexport.profiling.bandwidth import DTYPE_BYTES, StepBytes, measure_copy_bandwidth, mean_live_tokens  # noqa: E402
from arexport.runtime.loading import open_engine  # noqa: E402

GROUPS = {"MatMul": "matmul", "Gemm": "matmul", "MatMulNBits": "matmul", "MatMulInteger": "matmul",
          "DynamicQuantizeMatMul": "matmul", "FusedMatMul": "matmul", "QLinearMatMul": "matmul",
          "QuantizeLinear": "q/dq", "DequantizeLinear": "q/dq", "Attention": "attention",
          "MultiHeadAttention": "attention", "GroupQueryAttention": "attention", "TensorScatter": "attention",
          "SimplifiedLayerNormalization": "norm", "RMSNormalization": "norm", "SkipSimplifiedLayerNormalization": "norm",
          "ReduceMean": "norm", "Sqrt": "norm", "Reciprocal": "norm", "Pow": "norm",
          "RotaryEmbedding": "rotary", "Sigmoid": "ffn act", "Silu": "ffn act", "QuickGelu": "ffn act"}


def read_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Best-of-`repeats` pure read bandwidth in bytes/s: a sum over a large fp32 buffer (on torch's
    current threads: the caller sets them to the engine's)."""
    x = torch.ones(mib * (1 << 20) // 4)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        float(x.sum())
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def weight_read_bytes(engine_dir) -> int:
    """Bytes of the step graph's initializers a decode step reads: all of them except tables that
    only Gather nodes index (embeddings: a step reads a few rows). Counts what the graph really
    stores, so quantized engines (int8 / packed int4 weights) are measured as they are."""
    import onnx
    from onnx import numpy_helper  # noqa: F401  (sizes come from the tensor protos)

    model = onnx.load(str(Path(engine_dir) / "model.onnx"), load_external_data=False)
    consumers: dict[str, set] = defaultdict(set)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        if consumers.get(init.name) == {"Gather"}:
            continue
        n = 1
        for d in init.dims:
            n *= d
        bits = {1: 32, 10: 16, 16: 16, 2: 8, 3: 8, 21: 4, 22: 4, 7: 64, 6: 32, 9: 8}.get(init.data_type, 32)
        total += n * bits // 8
    return total


def decode_steps(eng, cache, n: int) -> list[float]:
    """Wall seconds of n decode steps through the runtime (each writes the next slot)."""
    out = []
    b = cache.batch
    for i in range(n):
        tok = torch.zeros(b, 1, dtype=torch.long)
        w = cache.length.clone()
        mask = cache.causal_mask(w, 1)
        t0 = time.perf_counter()
        eng.step(cache, tok, (w - eng.spec.cond_len)[:, None], w, mask)
        out.append(time.perf_counter() - t0)
    return out


def op_table(eng, cache, n: int) -> dict[str, float]:
    """Kernel microseconds per op type over n decode steps, from ORT's profiler."""
    import onnxruntime as ort

    sessions = eng.sessions
    opts = sessions.options
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    sessions._sessions.pop("step", None)
    eng._bindings.clear()
    sess = sessions.get("step")
    decode_steps(eng, cache, n)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    opts.enable_profiling = False
    per_op: dict[str, float] = defaultdict(float)
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            per_op[ev["args"]["op_name"]] += ev["dur"]
    del ort
    return dict(per_op)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="GPT-B")
    ap.add_argument("--engine", default=None, help="existing engine directory (skips the build)")
    ap.add_argument("--batch", type=int, default=2, help="cache rows (one image with CFG = 2)")
    ap.add_argument("--offset", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    engine_dir = args.engine
    if engine_dir is None or not Path(engine_dir, "manifest.json").exists():
        engine_dir = engine_dir or tempfile.mkdtemp(prefix="ort-ops-")
        loaded = load_model(args.model, random_init=True)
        build_engine(loaded, engine_dir, BuildOptions(batch_sizes=(args.batch,), verify_len=16, images=False,
                                                      overwrite=True))
    eng = open_engine(engine_dir, backend="ort", threads=args.threads)
    torch.set_num_threads(1)
    cache = fill(eng, args.batch, args.offset)
    decode_steps(eng, cache, 3)
    wall = sorted(decode_steps(eng, cache, args.steps))
    p50 = wall[len(wall) // 2]
    per_op = op_table(eng, cache, args.steps)
    total = sum(per_op.values())
    groups: dict[str, float] = defaultdict(float)
    for op, us in per_op.items():
        groups[GROUPS.get(op, "glue")] += us
    torch.set_num_threads(args.threads or os.cpu_count() or 1)  # the threads ORT's intra-op pool uses
    rb, cb = read_bandwidth(), measure_copy_bandwidth("cpu")
    torch.set_num_threads(1)
    spec = eng.spec  # the live K and V of every layer at the image's mean length, in the cache's precision
    kv = 2 * spec.n_cache_layers * args.batch * spec.n_kv_head * mean_live_tokens(spec) * spec.head_dim * DTYPE_BYTES[eng.manifest.precision]
    sb = StepBytes(weights=weight_read_bytes(engine_dir), kv=kv)
    mode = (eng.manifest.quantization or {}).get("mode", eng.manifest.precision)
    row = {"engine": f"{args.model} {mode}" + (" fused" if eng.manifest.export.get("fused_ops") else ""),
           "rows": args.batch, "read MiB": sb.total / 2**20, "decode p50 ms": p50 * 1e3,
           "read GB/s": rb / 1e9, "read floor ms": sb.total / rb * 1e3, "x read floor": p50 / (sb.total / rb),
           "copy GB/s": cb / 1e9, "copy floor ms": sb.total / cb * 1e3, "x copy floor": p50 / (sb.total / cb)}
    print(machine())
    print(markdown_table([row], list(row)))
    ops = [{"op": k, "ms/step": v / args.steps / 1e3, "share": v / total}
           for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])]
    print()
    print(markdown_table([{"group": g, "ms/step": v / args.steps / 1e3, "share": v / total}
                          for g, v in sorted(groups.items(), key=lambda kv: -kv[1])], ["group", "ms/step", "share"]))
    print()
    print(markdown_table(ops[:15], ["op", "ms/step", "share"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "summary": row, "ops": ops,
                                               "groups": dict(groups), "engine": engine_dir}, indent=1))


if __name__ == "__main__":
    main()
