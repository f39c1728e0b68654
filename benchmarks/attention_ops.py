#!/usr/bin/env python
"""ONNX Runtime CPU: which attention's cost follows the live length of a static KV cache (issue 35).

    python benchmarks/attention_ops.py --rows 16 --live 64,128,192,256

One-node (or few-node) graphs over a [rows, 12, 264, 64] fp32 cache (GPT-B's heads at its cache length),
a decode query (q = 1), 12 distinct caches in turn (one per GPT-B layer, so the caches do not sit in
the CPU cache), best of 3 passes; the time is for all 12:
* `Attention` over the whole cache under a boolean mask (the step graphs' default);
* `Attention` with `nonpad_kv_seqlen` (the ONNX way to say how much of the cache is live);
* `Slice` of K and V to the mask's width, then `Attention` (what `--live-attention` exports);
* MatMul / Softmax / MatMul written out over the whole cache, and over the Slice;
* com.microsoft `GroupQueryAttention` with past_present_share_buffer (cache bound in place; it takes the
  live length per row, but refuses q > 1 with several rows and masks only causally).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

H, S, D, LAYERS = 12, 264, 64, 12


def _const(name, value, dtype=T.INT64):
    return h.make_node("Constant", [], [name], value=h.make_tensor(name + "_v", dtype, [len(value)] if isinstance(value, list) else [], value if isinstance(value, list) else [value]))


def graph(kind: str, b: int) -> bytes:
    """The model bytes of one variant (see the module docstring)."""
    f = T.FLOAT
    ins = [h.make_tensor_value_info("q", f, [b, H, 1, D]), h.make_tensor_value_info("k", f, [b, H, S, D]),
           h.make_tensor_value_info("v", f, [b, H, S, D])]
    nodes, k, v = [], "k", "v"
    if kind == "nonpad":
        ins.append(h.make_tensor_value_info("n", T.INT64, [b]))
        nodes.append(h.make_node("Attention", ["q", "k", "v", "", "", "", "n"], ["o"]))
    elif kind == "gqa":
        ins = [h.make_tensor_value_info(n, f, [b, 1, H * D]) for n in ("q", "kn", "vn")] + [
            h.make_tensor_value_info("k", f, [b, H, S, D]), h.make_tensor_value_info("v", f, [b, H, S, D]),
            h.make_tensor_value_info("sk", T.INT32, [b]), h.make_tensor_value_info("tot", T.INT32, [])]
        nodes.append(h.make_node("GroupQueryAttention", ["q", "kn", "vn", "k", "v", "sk", "tot"], ["o", "pk", "pv"],
                                 domain="com.microsoft", num_heads=H, kv_num_heads=H))
    else:
        ins.append(h.make_tensor_value_info("m", T.BOOL, [b, 1, 1, "L"]))
        if kind.endswith("slice"):
            nodes += [h.make_node("Shape", ["m"], ["L"], start=3, end=4), _const("z", [0]), _const("ax", [2]),
                      h.make_node("Slice", ["k", "z", "L", "ax"], ["ks"]), h.make_node("Slice", ["v", "z", "L", "ax"], ["vs"])]
            k, v = "ks", "vs"
        if kind.startswith("matmul"):
            nodes += [h.make_node("Transpose", [k], ["kt"], perm=[0, 1, 3, 2]), h.make_node("MatMul", ["q", "kt"], ["s"]),
                      _const("sc", D ** -0.5, T.FLOAT), _const("ninf", -np.inf, T.FLOAT), h.make_node("Mul", ["s", "sc"], ["s2"]),
                      h.make_node("Where", ["m", "s2", "ninf"], ["s3"]), h.make_node("Softmax", ["s3"], ["p"], axis=-1),
                      h.make_node("MatMul", ["p", v], ["o"])]
        else:
            nodes.append(h.make_node("Attention", ["q", k, v, "m"], ["o"]))
    outs = [h.make_tensor_value_info(n, f, None) for n in (("o", "pk", "pv") if kind == "gqa" else ("o",))]
    opsets = [h.make_opsetid("", 24)] + ([h.make_opsetid("com.microsoft", 1)] if kind == "gqa" else [])
    return h.make_model(h.make_graph(nodes, kind, ins, outs), opset_imports=opsets).SerializeToString()


def run(kind: str, b: int, live: int, caches, threads: int) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(graph(kind, b), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    if kind == "gqa":
        qq = rng.standard_normal((b, 1, H * D), np.float32)
        binds = []
        for kc, vc in caches:
            io = sess.io_binding()
            kv = [ort.OrtValue.ortvalue_from_numpy(kc), ort.OrtValue.ortvalue_from_numpy(vc)]
            for n in ("q", "kn", "vn"):
                io.bind_cpu_input(n, qq)
            io.bind_ortvalue_input("k", kv[0])
            io.bind_ortvalue_input("v", kv[1])
            io.bind_ortvalue_output("pk", kv[0])  # in place: past_present_share_buffer
            io.bind_ortvalue_output("pv", kv[1])
            io.bind_output("o")
            io.bind_cpu_input("sk", np.full((b,), live - 1, np.int32))
            io.bind_cpu_input("tot", np.array(live, np.int32))
            binds.append((io, kv))
        call = lambda: [sess.run_with_iobinding(io) for io, _ in binds]  # noqa: E731
    else:
        q = rng.standard_normal((b, H, 1, D), np.float32)
        width = live if kind.endswith("slice") else S
        extra = {"n": np.full((b,), live, np.int64)} if kind == "nonpad" else {"m": np.arange(width)[None, None, None, :] < np.full((b, 1, 1, 1), live)}
        call = lambda: [sess.run(None, {"q": q, "k": kc, "v": vc, **extra}) for kc, vc in caches]  # noqa: E731
    best = float("inf")
    for _ in range(4):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--live", default="64,128,192,256")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    caches = [(rng.standard_normal((args.rows, H, S, D), np.float32), rng.standard_normal((args.rows, H, S, D), np.float32))
              for _ in range(LAYERS)]
    lives = [int(x) for x in args.live.split(",")]
    print(f"ORT CPU fp32, {args.rows} rows x {H} heads x {S} slots x {D}, q = 1, {LAYERS} caches per pass, ms per pass; "
          f"{machine()}")
    print("| variant | " + " | ".join(f"{x} live" for x in lives) + " |")
    print("|---|" + "---|" * len(lives))
    for kind in ("attention", "nonpad", "attention_slice", "matmul", "matmul_slice", "gqa"):
        print(f"| {kind} | " + " | ".join(f"{run(kind, args.rows, x, caches, args.threads) * 1e3:.1f}" for x in lives) + " |",
              flush=True)


if __name__ == "__main__":
    main()
