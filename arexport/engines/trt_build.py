"""TensorRT plans from an engine directory's ONNX graphs (TensorRT 10.15+ / 11 Python API).

* strongly typed networks: precision comes from the ONNX graph (TensorRT 11 has no FP16/INT8 flags);
* one plan per graph, one optimization profile per (step kind, batch): `decode` is q = 1, `verify`
  covers q in [2, K] with K as the optimum; batch is fixed per profile (static shapes, best kernels);
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

from arexport.errors import ArexportError, BackendUnavailable

MIN_TRT = (10, 15)  # TensorScatter -> IKVCacheUpdateLayer


def require_tensorrt():
    """Import tensorrt or raise BackendUnavailable saying why."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(
            "TensorRT is not installed (pip install 'arexport[trt]' on a machine with an NVIDIA GPU and driver); "
            f"import failed: {e}"
        ) from None
    ver = tuple(int(x) for x in trt.__version__.split(".")[:2])
    if ver < MIN_TRT:
        raise BackendUnavailable(f"TensorRT {trt.__version__} is too old: the KV-cache TensorScatter needs >= {'.'.join(map(str, MIN_TRT))}")
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs a CUDA GPU, and torch sees none on this machine")
    return trt


def current_gpu(device_index: int = 0) -> dict[str, str]:
    """{'name', 'compute_capability'} of a CUDA device."""
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    return {"name": torch.cuda.get_device_name(device_index), "compute_capability": f"{major}.{minor}"}


def check_plan_compat(trt_info: dict[str, Any], trt_version: str, gpu: dict[str, str]) -> None:
    """Refuse plans built with another TensorRT version or for another GPU architecture."""
    built = trt_info.get("version")
    if built != trt_version:
        raise ArexportError(f"TensorRT plans were built with TensorRT {built}, this machine has {trt_version}: rebuild with arexport build --backend trt")
    want = trt_info.get("gpu", {}).get("compute_capability")
    have = gpu.get("compute_capability")
    if want != have:
        raise ArexportError(
            f"TensorRT plans were built for {trt_info.get('gpu', {}).get('name')} (compute capability {want}), "
            f"this GPU is {gpu.get('name')} (compute capability {have}): rebuild on this GPU"
        )


def step_profiles(batch_sizes: list[int], verify_len: int, family: str = "llamagen") -> list[dict[str, Any]]:
    """Profile list for the step plan: per batch, decode (q=1) then verify (q in [2, K], optimum K);
    ARPG: one multi-query profile per batch with new tokens q and queries m in [1, K]."""
    out = []
    if family == "arpg":
        opt = max(1, verify_len // 8)
        return [{"kind": "multi_query", "batch": [b, b, b], "q": [1, opt, verify_len], "m": [1, opt, verify_len]}
                for b in sorted(set(batch_sizes))]
    for b in sorted(set(batch_sizes)):
        out.append({"kind": "decode", "batch": [b, b, b], "q": [1, 1, 1]})
        if verify_len > 1:
            out.append({"kind": "verify", "batch": [b, b, b], "q": [2, verify_len, verify_len]})
    return out


def graph_profiles(name: str, batch_sizes: list[int]) -> list[dict[str, Any]]:
    """Prefill: one static profile per batch; image decoder: one profile for 1..max images."""
    if name == "vq_decoder":
        m = max(batch_sizes)
        return [{"kind": name, "batch": [1, m, m], "q": [0, 0, 0]}]
    return [{"kind": name, "batch": [b, b, b], "q": [0, 0, 0]} for b in sorted(set(batch_sizes))]


def select_profile(profiles: list[dict[str, Any]], kind: str, batch: int, q: int) -> int:
    """Index of the profile serving a call, or ArexportError listing what the plan has."""
    for i, p in enumerate(profiles):
        b_ok = p["batch"][0] <= batch <= p["batch"][2]
        if not b_ok:
            continue
        if p["kind"] in ("decode", "verify"):
            if kind in ("decode", "verify") and p["q"][0] <= q <= p["q"][2]:
                return i
        elif p["kind"] == "multi_query":
            if kind == "multi_query":
                return i
        elif p["kind"] == kind:
            return i
    have = ", ".join(f"{p['kind']} batch {p['batch'][0]}-{p['batch'][2]} q {p['q'][0]}-{p['q'][2]}" for p in profiles)
    raise ArexportError(f"no TensorRT profile for {kind} with batch {batch}, q {q}; the plan has: {have}")


def _shape_for(dims: list, batch: int, q: int, m: int = 1) -> tuple[int, ...]:
    out = []
    for d in dims:
        if d == "batch":
            out.append(batch)
        elif d == "q":
            out.append(q)
        elif d == "m":
            out.append(m)
        elif isinstance(d, int) and d > 0:
            out.append(d)
        else:
            raise ArexportError(f"cannot make a TensorRT profile for dimension {d!r}")
    return tuple(out)


def build_plans(directory: Path, manifest: dict[str, Any], opts, report: Callable[[str], None]) -> dict[str, Any]:
    """Build every graph's plan into `directory`; returns the manifest's `tensorrt` section."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = Path(opts.trt_timing_cache) if opts.trt_timing_cache else None
    plans: dict[str, Any] = {}
    batch_sizes = manifest["profiles"]["batch_sizes"]
    for name, graph in manifest["graphs"].items():
        if name == "step":
            profiles = step_profiles(batch_sizes, manifest["profiles"]["verify_len"], manifest["spec"]["family"])
        else:
            profiles = graph_profiles(name, batch_sizes)
        report(f"TensorRT: {graph['file']} with {len(profiles)} profiles")
        plan_file = Path(graph["file"]).with_suffix(".plan").name
        _build_one(trt, logger, directory / graph["file"], directory / plan_file, graph["inputs"], profiles, opts, cache_path)
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
    for p in profiles:
        prof = builder.create_optimization_profile()
        for vi in inputs:
            m = p.get("m", [1, 1, 1])
            lo, opt, hi = (_shape_for(vi["shape"], p["batch"][j], p["q"][j] or 1, m[j]) for j in range(3))
            prof.set_shape(vi["name"], lo, opt, hi)
        config.add_optimization_profile(prof)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ArexportError(f"TensorRT failed to build a plan for {onnx_path.name} (see the TensorRT log above)")
    plan_path.write_bytes(bytes(blob))
    if cache_path:
        from arexport.fileio import atomic_write_bytes

        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
