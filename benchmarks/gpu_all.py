#!/usr/bin/env python
"""The GPU profile of the run-book (issue 19): one JSON and one markdown table.

    python benchmarks/gpu_all.py --out /tmp/arexport-gpu            # on a CUDA machine
    python benchmarks/gpu_all.py --device cpu --smoke --out /tmp/x  # the same code on the demo (CI)

For LlamaGen-XL shapes (ar, sjd window 16, sjd latency-aware) and ARPG-XL shapes (arpg, 64 steps),
random weights in bf16, batch 1 and 8 images (CFG doubles the rows), torch eager and CUDA graphs:
per-image latency, decode p50, engine and host ms per step, forwards per image, and the decode
step's fraction of the HBM floor (bytes a decode step reads / copy bandwidth measured in the same
run). Each config runs in-process through the same profiler as `arexport profile`. Backends this
machine lacks (TensorRT, onnxruntime-gpu) are listed under `skipped` with the reason, never
silently left out. The JSON and the table are rewritten after every config, and `--budget-s` stops
starting new configs once that much time has passed (they are listed as not run), so a run on a
leased machine with a time limit always leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent))  # this checkout's arexport, installed or not
from common import git_rev, machine, markdown_table  # noqa: E402

from arexport.profiling.bandwidth import measure_copy_bandwidth  # noqa: E402
from arexport.profiling.profiler import RunConfig, profile_generator  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import default_sampling  # noqa: E402

# (model, precision, method configs); --smoke swaps in the demo models at fp32
FULL = [("GPT-XL", "bf16", ["torch:ar", "torch:sjd:window=16", "torch:sjd"]),
        ("arpg-XL", "bf16", ["torch:arpg:steps=64"])]
SMOKE = [("demo", "fp32", ["torch:ar", "torch:sjd:window=16", "torch:sjd"]),
         ("demo-arpg", "fp32", ["torch:arpg:steps=16"])]


def skipped_backends(device: str) -> list[str]:
    """What the run-book cannot run here, each with the reason."""
    out = []
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # the stub wheel raises on import, a missing one ImportError
        out.append(f"trt: TensorRT not importable ({type(e).__name__})")
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            out.append("ort on cuda: onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu not installed)")
    except ImportError as e:
        out.append(f"ort: {e}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        out.append("cuda: torch sees no CUDA device")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True, help="folder for gpu_all.json and gpu_all.md")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="demo models, batch 1, one repeat (checks the script, not the GPU)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no new config after this many seconds (default 420; what is left is listed as not run)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("gpu_all: no CUDA device visible to torch; nothing to profile (use --device cpu --smoke to test the script)",
              file=sys.stderr)
        return 1
    plan = SMOKE if args.smoke else FULL
    batches = [1] if args.smoke else [int(b) for b in args.batches.split(",")]
    graphs = [False, True] if cuda else [False]
    repeats = 1 if args.smoke else args.repeats
    t_start = time.perf_counter()
    bw = measure_copy_bandwidth(args.device)
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if cuda else None
    rows, results, not_run = [], [], []
    cols = ["model", "batch", "cuda graph", "config", "ms/image", "decode p50 ms", "engine ms/step", "host ms/step",
            "fwd/image", "floor fraction"]

    def write() -> None:
        """The JSON and the markdown table as they stand (called after every config)."""
        skipped = skipped_backends(args.device)
        doc = {"machine": machine(), "device": args.device, "gpu": gpu, "copy_bandwidth_gbps": bw / 1e9,
               "git": git_rev(), "smoke": args.smoke, "skipped": skipped, "not_run": not_run, "rows": results}
        (out / "gpu_all.json").write_text(json.dumps(doc, indent=1, default=str))
        md = [f"Machine: {doc['machine']}" + (f"; GPU {gpu}" if gpu else ""),
              f"Copy bandwidth {bw / 1e9:.0f} GB/s; git {doc['git']}", "", markdown_table(rows, cols), ""]
        md += [f"- skipped: {s}" for s in skipped] + [f"- not run (time budget): {s}" for s in not_run]
        (out / "gpu_all.md").write_text("\n".join(md) + "\n")

    for model, precision, configs in plan:
        for graph in graphs:
            todo = [(b, text) for b in batches for text in configs]
            label = lambda b, text: f"{model} batch {b} cuda graph {'yes' if graph else 'no'} {text}"  # noqa: E731
            if time.perf_counter() - t_start > args.budget_s:
                not_run += [label(b, text) for b, text in todo]
                continue
            kw = {} if model.startswith("demo") else {"random_init": True}
            gen = Generator.load(model, backend="torch", device=args.device, dtype=precision, cuda_graph=graph, **kw)
            sampling = default_sampling(gen.spec, cfg_scale=4.0)
            for b, text in todo:
                if time.perf_counter() - t_start > args.budget_s:
                    not_run.append(label(b, text))
                    continue
                classes = [i % gen.spec.num_classes for i in range(b)]
                cfg = RunConfig.parse(text)
                t0 = time.perf_counter()
                r = profile_generator(gen, cfg, classes, sampling, b, warmup=1, repeats=repeats, bandwidth=bw,
                                      precision=precision)
                bwd = r.bandwidth or {}
                row = {"model": model, "precision": precision, "batch": b, "cuda graph": "yes" if graph else "no",
                       "config": r.label, "ms/image": r.image_ms["p50"],
                       "decode p50 ms": r.steps.get("decode", {}).get("p50_ms", float("nan")),
                       "engine ms/step": r.engine_ms_per_step, "host ms/step": r.host_ms_per_step,
                       "fwd/image": r.target_forwards_per_image,
                       "floor fraction": bwd.get("fraction_of_floor", float("nan")),
                       "seconds": time.perf_counter() - t0}
                rows.append(row)
                results.append({**row, "result": r.as_dict()})
                write()
                print(f"{model} b{b} graph={graph} {r.label}: {row['ms/image']:.1f} ms/image", file=sys.stderr)
            del gen
            if cuda:
                torch.cuda.empty_cache()
    write()
    print((out / "gpu_all.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
