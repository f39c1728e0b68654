#!/usr/bin/env python
"""The GPU profile of the run-book (issues 19, 29): one JSON and one markdown table.

    python benchmarks/gpu_all.py --out /tmp/arexport-gpu            # on a CUDA machine
    python benchmarks/gpu_all.py --device cpu --smoke --out /tmp/x  # the same code on the demo (CI)

For each backend this machine has -- torch (eager and CUDA graphs), ONNX Runtime on CUDA (eager and
CUDA graphs: static IOBinding buffers, runtime/backends/ort/runner.py) and TensorRT (eager and CUDA
graphs) -- and for LlamaGen-XL shapes (ar, sjd window 16, sjd latency-aware) and ARPG-XL shapes
(arpg, 64 steps), random weights in bf16, batch 1 and 8 images (CFG doubles the rows): per-image
wall clock, decode p50, engine and host ms per step, forwards per image, the decode step's fraction
of the HBM floor and every config's step floor fraction (bytes a step reads / copy bandwidth
measured in the same run, over its engine ms per step), and beside the speed the quality the config
costs (profiling/quality_column.py, as `arexport profile` prints it: on the digits demos the judge's
accuracy and feature distance; on every model the fraction of tokens equal to ar's and the token-
histogram TV distance vs ar, same seed, on --quality-images untimed images); then images/s of the image
decoder at batch 1, 8 and 32. ONNX Runtime and TensorRT engines are built into --out/engines first (their
build seconds are recorded). A backend the machine lacks is listed under `skipped` with the reason,
never silently left out and never a failure. The JSON and the table are rewritten after every
config, and `--budget-s` stops starting new configs once that much time has passed (they are listed
as not run), so a run on a leased machine with a time limit always leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent))  # this checkout's arexport, installed or not
from common import git_rev, machine, markdown_table  # noqa: E402

from arexport.profiling.bandwidth import floor_seconds, mean_live_tokens, measure_copy_bandwidth, step_bytes  # noqa: E402
from arexport.profiling.profiler import RunConfig, profile_generator  # noqa: E402
from arexport.profiling.quality_column import MAX_QUALITY_IMAGES, measure_quality  # noqa: E402
from arexport.runtime.generator import Generator  # noqa: E402
from arexport.runtime.sampling import default_sampling  # noqa: E402

# (model, precision, methods); --smoke swaps in the demo models at fp32
FULL = [("GPT-XL", "bf16", ["ar", "sjd:window=16", "sjd"]), ("arpg-XL", "bf16", ["arpg:steps=64"])]
SMOKE = [("demo", "fp32", ["ar", "sjd:window=16", "sjd"]), ("demo-arpg", "fp32", ["arpg:steps=16"])]
DECODER_BATCHES = (1, 8, 32)
QUALITY_BATCH = 8  # images per batch of the untimed quality runs (a seed's tokens do not depend on the batch)
QUALITY_COLS = {"judge accuracy": "accuracy", "judge FD": "feature_distance", "tokens = ar": "tokens_equal_ar",
                "token TV vs ar": "token_tv_vs_ar"}


def backend_reason(backend: str, device: str) -> str | None:
    """None when `backend` can run on `device` here, else why not."""
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if backend == "ort" and cuda:
        try:
            import onnxruntime as ort
        except ImportError as e:
            return f"onnxruntime not importable ({e})"
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (onnxruntime-gpu not installed: arexport[gpu])"
    if backend == "trt":
        try:
            from arexport.devices import require_tensorrt

            require_tensorrt()
        except Exception as e:  # BackendUnavailable, or the placeholder wheel raising on import
            return f"TensorRT unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return None


def plan_backends(device: str, smoke: bool) -> tuple[list[tuple[str, bool]], list[str]]:
    """(backend, cuda graph) pairs to run here, and the skipped ones with their reasons."""
    cuda = device.startswith("cuda")
    runs, skipped = [], []
    for backend in ("torch", "ort", "trt"):
        why = backend_reason(backend, device)
        if why is None and backend == "trt" and not cuda:
            why = "TensorRT runs on a CUDA device only"
        if why is None and backend == "ort" and not cuda and not smoke:
            why = "ONNX Runtime on the CPU is profiled by benchmarks/profile_methods.py, not the GPU run-book"
        if why:
            skipped.append(f"{backend}: {why}")
            continue
        runs += [(backend, g) for g in ([False, True] if cuda else [False])]
    return runs, skipped


def build_engine_dir(model: str, precision: str, backend: str, root: Path, random_init: bool) -> tuple[Path, float]:
    """An engine directory of `model` for `backend` (ort: ONNX graphs; trt: plus plans), built once."""
    from arexport.exporter.build import BuildOptions, build_engine
    from arexport.models.registry import load_model

    out = root / f"{model}-{precision}-{backend}"
    if (out / "manifest.json").exists():
        return out, 0.0
    t0 = time.perf_counter()
    loaded = load_model(model, random_init=True) if random_init else load_model(model)
    arpg = loaded.spec.family == "arpg"
    build_engine(loaded, out, BuildOptions(precision=precision, batch_sizes=[1, 2, 8, 16, 32],
                                           verify_len=None if arpg else 16, backend="trt" if backend == "trt" else "onnx"))
    return out, time.perf_counter() - t0


def decoder_rate(engine, batch: int, repeats: int) -> dict:
    """Images per second of the engine's image decoder on `batch` random token rows (median of `repeats`)."""
    g = torch.Generator().manual_seed(batch)
    tokens = torch.randint(0, engine.spec.vocab_size, (batch, engine.spec.n_tokens), generator=g)
    engine.decode_images(tokens)  # warm-up (and, on CUDA, allocator growth)
    times = []
    for _ in range(repeats):
        engine._sync()
        t0 = time.perf_counter()
        engine.decode_images(tokens)
        engine._sync()
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    return {"ms/batch": s * 1e3, "images/s": batch / s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True, help="folder for gpu_all.json, gpu_all.md and the built engines")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="demo models, batch 1, one repeat (checks the script, not the GPU)")
    ap.add_argument("--quality-images", type=int, default=None,
                    help=f"untimed images scored per config beside its speed (default 16, 4 with --smoke; 0 = off; at most "
                         f"{MAX_QUALITY_IMAGES})")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no new config after this many seconds (default 420; what is left is listed as not run)")
    args = ap.parse_args()
    n_quality = args.quality_images if args.quality_images is not None else (4 if args.smoke else 16)
    if not 0 <= n_quality <= MAX_QUALITY_IMAGES:
        ap.error(f"--quality-images must be 0..{MAX_QUALITY_IMAGES}, got {n_quality}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("gpu_all: no CUDA device visible to torch; nothing to profile (use --device cpu --smoke to test the script)",
              file=sys.stderr)
        return 1
    plan = SMOKE if args.smoke else FULL
    batches = [1] if args.smoke else [int(b) for b in args.batches.split(",")]
    repeats = 1 if args.smoke else args.repeats
    runs, skipped = plan_backends(args.device, args.smoke)
    t_start = time.perf_counter()
    bw = measure_copy_bandwidth(args.device)
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if cuda else None
    rows, results, decoder_rows, builds, not_run = [], [], [], [], []
    ar_caches: dict[tuple, dict] = {}  # ar's quality tokens per (model, backend, cuda graph): ar runs once for all configs
    cols = ["model", "batch", "cuda graph", "config", "ms/image", "decode p50 ms", "engine ms/step", "host ms/step",
            "fwd/image", "floor fraction", "step floor fraction"] + (list(QUALITY_COLS) if n_quality else [])
    dcols = ["model", "backend", "batch", "ms/batch", "images/s"]

    def write() -> None:
        """The JSON and the markdown tables as they stand (called after every config)."""
        doc = {"machine": machine(), "device": args.device, "gpu": gpu, "copy_bandwidth_gbps": bw / 1e9,
               "git": git_rev(), "smoke": args.smoke, "skipped": skipped, "not_run": not_run, "builds": builds,
               "rows": results, "decoder": decoder_rows}
        (out / "gpu_all.json").write_text(json.dumps(doc, indent=1, default=str))
        md = [f"Machine: {doc['machine']}" + (f"; GPU {gpu}" if gpu else ""),
              f"Copy bandwidth {bw / 1e9:.0f} GB/s (the HBM floor of every row, measured in this run); git {doc['git']}",
              *([f"Quality (untimed, {n_quality} images per config, seed 0): judge accuracy and FD on the digits demos only; "
                 "tokens = ar and token TV vs ar against ar's tokens on the same engine"] if n_quality else []),
              "", markdown_table(rows, cols), "", "Image decoder:", "", markdown_table(decoder_rows, dcols), ""]
        md += [f"- built: {b['engine']} in {b['seconds']:.0f} s" for b in builds]
        md += [f"- skipped: {s}" for s in skipped] + [f"- not run (time budget): {s}" for s in not_run]
        (out / "gpu_all.md").write_text("\n".join(md) + "\n")

    over = lambda: time.perf_counter() - t_start > args.budget_s  # noqa: E731
    for model, precision, methods in plan:
        for backend, graph in runs:
            if backend == "ort" and args.smoke and model != plan[0][0]:
                continue  # the CPU smoke run checks the ORT path on the first model only
            configs = [m for m in methods if not (backend == "ort" and args.smoke and m != "ar")]
            todo = [(b, f"{backend}:{m}") for b in batches for m in configs]
            label = lambda b, text: f"{model} batch {b} cuda graph {'yes' if graph else 'no'} {text}"  # noqa: E731
            if over():
                not_run += [label(b, text) for b, text in todo]
                continue
            random_init = not model.startswith("demo")
            try:
                if backend == "torch":
                    kw = {"random_init": True} if random_init else {}
                    gen = Generator.load(model, backend="torch", device=args.device, dtype=precision, cuda_graph=graph, **kw)
                else:
                    path, secs = build_engine_dir(model, precision, backend, out / "engines", random_init)
                    if secs:
                        builds.append({"engine": str(path), "seconds": secs})
                    gen = Generator.load(str(path), backend=backend, device=args.device, cuda_graph=graph)
            except Exception as e:  # a backend that cannot load this model here: say so, go on
                skipped.append(f"{label(0, backend)}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                write()
                continue
            sampling = default_sampling(gen.spec, cfg_scale=4.0)
            for b, text in todo:
                if over():
                    not_run.append(label(b, text))
                    continue
                classes = [i % gen.spec.num_classes for i in range(b)]
                t0 = time.perf_counter()
                cfg = RunConfig.parse(text)
                r = profile_generator(gen, cfg, classes, sampling, b, warmup=1, repeats=repeats,
                                      bandwidth=bw, precision=precision)
                if n_quality:  # untimed, after the timed runs: the cost beside the speed
                    r.quality = measure_quality(gen, cfg.method or gen.engine.family.default_method, cfg.options, classes,
                                                sampling, QUALITY_BATCH, n_quality,
                                                ar_cache=ar_caches.setdefault((model, backend, graph), {}))
                rows_per_step = 2 * b if sampling.uses_cfg else b
                sb = step_bytes(gen.spec, precision, precision, rows_per_step, mean_live_tokens(gen.spec))
                step_floor = floor_seconds(sb.total, bw) * 1e3 / r.engine_ms_per_step if r.engine_ms_per_step else float("nan")
                row = {"model": model, "precision": precision, "batch": b, "cuda graph": "yes" if graph else "no",
                       "config": r.label, "ms/image": r.image_ms["p50"],
                       "decode p50 ms": r.steps.get("decode", {}).get("p50_ms", float("nan")),
                       "engine ms/step": r.engine_ms_per_step, "host ms/step": r.host_ms_per_step,
                       "fwd/image": r.target_forwards_per_image,
                       "floor fraction": (r.bandwidth or {}).get("fraction_of_floor", float("nan")),
                       "step floor fraction": step_floor,
                       **{c: r.quality.get(k, "-") for c, k in QUALITY_COLS.items() if n_quality},
                       "seconds": time.perf_counter() - t0}
                rows.append(row)
                results.append({**row, "result": r.as_dict()})
                write()
                print(f"{model} b{b} graph={graph} {r.label}: {row['ms/image']:.1f} ms/image", file=sys.stderr)
            if not graph and gen.engine.has_images:  # the decoder runs outside CUDA graphs: once per backend
                for b in DECODER_BATCHES:
                    if over():
                        not_run.append(f"{model} {backend} image decoder batch {b}")
                        continue
                    decoder_rows.append({"model": model, "backend": backend, "batch": b,
                                         **decoder_rate(gen.engine, b, 1 if args.smoke else 3)})
                    write()
            del gen
            if cuda:
                torch.cuda.empty_cache()
    write()
    print((out / "gpu_all.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
