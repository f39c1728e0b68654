#!/usr/bin/env python
"""CPU and wall time per call of an exported draft head on ONNX Runtime: the in-place runner (OrtDraftHead.step,
cache bound as past_* and present_*) against a plain session.run that feeds the cache as numpy and copies the
present_* outputs back (the runner before the in-place change), on the same head directory.

    OMP_NUM_THREADS=1 python benchmarks/head_call.py --head H [--rows 2] [--q 1,4,6] [--calls 3000] [--threads N]

Both sides are checked bit-equal (outputs and caches) before timing. Results: docs/benchmarks.md, "issue 30: the
exported head's cache in place".
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from arexport.runtime.backends.ort.head import OrtDraftHead, read_head_info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head", required=True, help="head directory from `arexport build-head`")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--q", default="1,4,6")
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads of both sessions (ORT default: one per core)")
    args = ap.parse_args()
    import onnxruntime as ort
    from pathlib import Path

    info = read_head_info(Path(args.head), "--head")
    dim, vocab = int(info["config"]["hidden_size"]), int(info["config"]["vocab_size"])
    head = OrtDraftHead(args.head, dim, vocab, threads=args.threads)
    so = ort.SessionOptions()
    so.log_severity_level = 3  # as the earlier runner: its in-place fallback warnings were not printed
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if args.threads:
        so.intra_op_num_threads = args.threads
    plain = ort.InferenceSession(str(Path(args.head) / info["graph"]), so, providers=["CPUExecutionProvider"])
    present = [f"present_{k}_{i}" for i in range(head.cfg.n_layer) for k in ("key", "value")]

    def plain_step(hidden, tokens, positions, write, mask, keys, values):
        feeds = {"hidden": hidden.numpy(), "tokens": tokens.numpy(), "positions": positions.numpy(),
                 "write_index": write.numpy(), "attn_mask": mask.numpy()}
        for i, (k, v) in enumerate(zip(keys, values)):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = k.numpy(), v.numpy()
        outs = plain.run(["logits", "hidden_out", *present], feeds)
        for buf, new in zip([t for kv in zip(keys, values) for t in kv], outs[2:]):
            buf.copy_(torch.from_numpy(np.asarray(new)))
        return torch.from_numpy(outs[0]), torch.from_numpy(outs[1])

    g = torch.Generator().manual_seed(0)
    b = args.rows
    print(f"head {args.head}: rows {b}, {args.calls} calls per side, threads {args.threads or 'default'}")
    print("| q | plain run CPU / wall us | in place CPU / wall us |")
    print("|---|---|---|")
    for q in [int(x) for x in args.q.split(",")]:
        hidden = torch.randn(b, q, dim, generator=g)
        tokens = torch.randint(0, vocab, (b, q), generator=g)
        write = torch.full((b,), 5)
        positions = write[:, None] + torch.arange(q)
        mask = (torch.arange(head.slots)[None, None, :] <= positions[:, :, None])[:, None]
        cells, results = [], []
        for fn in (plain_step, lambda *a: head.step(*a)[:2]):
            keys, values = head.allocate(b, head.slots)
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(args.calls):
                out = fn(hidden, tokens, positions, write, mask, keys, values)
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            cells.append(f"{1e6 * cpu / args.calls:.1f} / {1e6 * wall / args.calls:.1f}")
            results.append((*out, *keys, *values))
        if not all(torch.equal(x, y) for x, y in zip(*results)):
            raise SystemExit(f"q {q}: the in-place runner differs from the plain run")
        print(f"| {q} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
