"""TensorRT plans from an engine directory's ONNX graphs (TensorRT 10.15+ / 11 Python API).

* strongly typed networks: precision comes from the ONNX graph (TensorRT 11 has no FP16/INT8 flags);
* one plan per graph; a step graph's optimization profiles are the ranges its step-kind declaration
  states (format.stepkinds), each covering batches of 1..max rows (the scheduler's live rows change
  every step), e.g. `decode` q = 1 and `verify` q in [2, K] with K as the optimum;
* a timing cache (read if given, updated after the build) and the builder optimization level;
* the manifest records TensorRT's version and the GPU (name, compute capability) the plans are for;
  the runtime refuses plans built for another GPU or TensorRT version.

TensorRT cannot be installed on the development machines of this project: everything here is
written against the documented API and is exercised only where `tensorrt` imports (tests skip
with a reason otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from arexport.devices import current_gpu, require_tensorrt
from arexport.errors import ArexportError
from arexport.families import get_family
from arexport.format.profiles import graph_profiles, step_profiles


def _shape_for(dims: list, batch: int, q: int, m: int = 1, live: int = 1) -> tuple[int, ...]:
    out = []
    for d in dims:
        if d == "batch":
            out.append(batch)
        elif d == "L":  # the masks' live bound (format.stepkinds.MASKED)
            out.append(live)
        elif d == "q":
            out.append(q)
        elif d == "m":
            out.append(m)
        elif isinstance(d, int) and d > 0:
            out.append(d)
        else:
            raise ArexportError(f"cannot make a TensorRT profile for dimension {d!r}")
    return tuple(out)


def build_plans(directory: Path, manifest, opts, report: Callable[[str], None]) -> dict[str, Any]:
    """Build every graph's plan into `directory` (manifest: a format.Manifest); returns its `tensorrt` section."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = Path(opts.trt_timing_cache) if opts.trt_timing_cache else None
    plans: dict[str, Any] = {}
    batch_sizes = manifest.profiles.batch_sizes
    steps = manifest.step_graphs()
    exact = get_family(manifest.spec.family).exact_query_sizes(manifest.spec)
    for name, graph in manifest.graphs.items():
        if name in steps:  # the step kind's declared ranges
            profiles = step_profiles(batch_sizes, manifest.max_q, steps[name], exact)
        else:
            profiles = graph_profiles(name, batch_sizes)
        report(f"TensorRT: {graph.file} with {len(profiles)} profiles")
        plan_file = Path(graph.file).with_suffix(".plan").name
        _build_one(trt, logger, directory / graph.file, directory / plan_file, graph.inputs, profiles, opts, cache_path)
        plans[plan_file] = {"graph": name, "profiles": profiles}
    return {"version": trt.__version__, "gpu": current_gpu(), "plans": plans, "strongly_typed": True,
            "builder_optimization_level": opts.trt_opt_level}


def _build_one(trt, logger, onnx_path: Path, plan_path: Path, inputs: list[dict], profiles, opts, cache_path):
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArexportError(f"TensorRT could not parse {onnx_path.name}: {errs}")
    config = builder.create_builder_config()
    config.builder_optimization_level = opts.trt_opt_level
    if opts.trt_workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.trt_workspace_gb * (1 << 30)))
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.exists() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    # masks narrowed to the live bound take any width 1..S (tuned for the whole cache, the slowest step)
    slots = max([vi["shape"][2] for vi in inputs if vi["name"].startswith("past_key")] or [1])
    live = (1, slots, slots)
    for p in profiles:
        prof = builder.create_optimization_profile()
        for vi in inputs:
            m = p.get("m", [1, 1, 1])
            lo, opt, hi = (_shape_for(vi["shape"], p["batch"][j], p["q"][j] or 1, m[j], live[j]) for j in range(3))
            prof.set_shape(vi["name"], lo, opt, hi)
        config.add_optimization_profile(prof)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ArexportError(f"TensorRT failed to build a plan for {onnx_path.name} (see the TensorRT log above)")
    plan_path.write_bytes(bytes(blob))
    if cache_path:
        from arexport.fileio import atomic_write_bytes

        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))


def check_targets(directory: Path, graphs: dict, report: Callable[[str], None]) -> None:
    """Refuse (TargetUnsupported) graphs that ONNX Runtime's CUDA provider would not run on the GPU or
    that TensorRT's parser would not import, per the support tables (format/coverage.py); report
    nodes ONNX Runtime inlines."""
    from arexport.format.coverage import TargetUnsupported, check_graph

    bad = []
    for target in ("cuda", "trt"):
        for name, g in graphs.items():
            for f in check_graph(Path(directory) / g.file, target, name):
                if f.severity in ("fail", "fallback"):
                    bad.append(f"--target {target}: {f.line()}")
                else:
                    report(f"{target}: {f.line()}")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise TargetUnsupported("graphs the GPU targets cannot run: " + "; ".join(bad[:3]) + more
                                + " (arexport inspect DIR --target cuda|trt lists them all)")
