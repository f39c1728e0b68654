"""Run generations under timing and summarise them: the engine of `arexport profile`."""

from __future__ import annotations

import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from arexport.devices import precision_of
from arexport.profiling.bandwidth import floor_seconds, mean_live_tokens, step_bytes
from arexport.runtime.engine import HEAD_RECORD, NOT_FORWARDS
from arexport.runtime.generator import Generator
from arexport.runtime.methods.base import parse_method_options
from arexport.runtime.sampling import SamplingParams
from arexport.runtime.stats import percentiles
from arexport.runtime.step_cost import LATENCY_AWARE, measure_for_profile

SCHEMA_VERSION = 1
KIND_ORDER = ("prefill", "decode", "verify", "multi_query", "scale", "next_scale", "vq_decode", "latent_decode")


@dataclass
class RunConfig:
    """One thing to profile: a backend and a method (plus method options)."""

    backend: str
    method: str
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.backend}:{self.method}" + (f"[{opts}]" if opts else "")

    @classmethod
    def parse(cls, text: str) -> "RunConfig":
        """'ort:sjd:window=16;init=random' -> RunConfig."""
        parts = text.split(":", 2)
        if len(parts) < 2:
            raise ValueError(f"bad --compare entry {text!r}: expected backend:method[:k=v;k=v]")
        opts = parse_method_options(parts[2].split(";"), "--compare option") if len(parts) == 3 and parts[2] else {}
        return cls(parts[0], parts[1], opts)


@dataclass
class ProfileResult:
    label: str
    backend: str
    method: str
    device: str
    images: int
    repeats: int
    steps: dict[str, dict[str, float]]  # kind -> count, mean_ms, p50_ms, p90_ms, p99_ms
    image_ms: dict[str, float]  # per-image latency percentiles over repeats (batch latency / images)
    images_per_s: float
    tokens_per_s: float
    target_forwards_per_image: float
    mean_accepted_length: Optional[float]
    peak_memory_bytes: int
    peak_memory_kind: str
    trace: list[dict[str, Any]]  # one generation's steps in order: kind, q, ms
    bandwidth: dict[str, float] = field(default_factory=dict)
    # the runtime's own cost: per target step, the wall time outside every engine call (target, draft
    # and image decoder) next to the target engine's time, means over the timed repeats
    engine_ms_per_step: float = float("nan")
    host_ms_per_step: float = float("nan")
    head_ms_per_step: float = 0.0  # an EAGLE draft head's calls (eagle, lantern/vvs --draft-head), per target step
    # latency curves the speculative methods measured (engine -> "rows,max_q" -> seconds per q = 1..max_q);
    # `generate/serve --latency-profile` reads them back instead of measuring (runtime/engine.py)
    latency_curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # the cost beside the speed (profiling/quality_column.py): demo judge scores and agreement with `ar`
    quality: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def summarize_steps(records) -> dict[str, dict[str, float]]:
    """Per step kind: count and latency statistics in ms."""
    out = {}
    for kind in sorted({r.kind for r in records}, key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else 99):
        ms = [r.seconds * 1e3 for r in records if r.kind == kind]
        out[kind] = {"count": len(ms), "mean_ms": float(np.mean(ms)), **{f"{k}_ms": v for k, v in percentiles(ms).items()}}
    return out


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib * (1 if platform.system() == "Darwin" else 1024)), "process peak RSS"


def profile_generator(gen: Generator, cfg: RunConfig, classes: list[int], sampling: SamplingParams, batch_size: int,
                      warmup: int = 1, repeats: int = 3, bandwidth: Optional[float] = None,
                      precision: str = "fp32", prompts: Optional[list[str]] = None) -> ProfileResult:
    """Warm up, then `repeats` timed generations of `classes` (or `prompts`, text-conditional models);
    statistics over all timed steps."""
    dev = gen.engine.device
    conds = {"prompts": prompts} if prompts else {"classes": classes}
    classes = prompts or classes  # what is counted: one image each
    for _ in range(warmup):
        gen.generate(**{k: v[:batch_size] for k, v in conds.items()}, method=cfg.method, method_options=cfg.options,
                     sampling=sampling, batch_size=batch_size, images=False, timings=False)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    records, image_s, stats, trace = [], [], None, []
    t_all = host_s = engine_s = head_s = 0.0
    n_steps = 0
    for r in range(repeats):
        t0 = time.perf_counter()
        res = gen.generate(**conds, method=cfg.method, method_options=cfg.options, sampling=sampling,
                           batch_size=batch_size, images=gen.engine.has_images, timings=True, seed=r)
        dt = time.perf_counter() - t0
        t_all += dt
        image_s.append(dt / len(classes))
        records += list(gen.engine.records)
        # VAR: next_scale is step work; a draft head's calls are neither the target's nor the host's time
        steps_r = [x for x in gen.engine.records if x.kind not in ("vq_decode", "latent_decode", HEAD_RECORD)]
        head_s += sum(x.seconds for x in gen.engine.records if x.kind == HEAD_RECORD)
        outside = sum(x.seconds for x in gen.engine.records) + sum(x.seconds for x in (gen.draft.records if gen.draft else ()))
        host_s += dt - outside
        engine_s += sum(x.seconds for x in steps_r)
        n_steps += sum(x.kind not in NOT_FORWARDS for x in steps_r)
        if r == 0:
            trace = [{"kind": x.kind, "q": x.q, "ms": x.seconds * 1e3} for x in gen.engine.records]
            stats = res.stats
    if cfg.method in LATENCY_AWARE:  # the curves `--latency-profile` reads back (decoding itself times nothing)
        measure_for_profile(gen.engine, gen.draft, 2 if sampling.uses_cfg else 1)
    steps = summarize_steps(records)
    n_img = len(classes) * repeats
    peak, peak_kind = _peak_memory(dev)
    out = ProfileResult(
        label=cfg.label, backend=cfg.backend, method=cfg.method, device=str(dev), images=len(classes), repeats=repeats,
        steps=steps, image_ms={k: v * 1e3 for k, v in percentiles(image_s).items()},
        images_per_s=n_img / t_all, tokens_per_s=n_img * gen.spec.n_tokens / t_all,
        target_forwards_per_image=float(stats["target_forwards_per_image"]),
        mean_accepted_length=stats.get("mean_accepted_length"), peak_memory_bytes=peak, peak_memory_kind=peak_kind,
        trace=trace, engine_ms_per_step=1e3 * engine_s / max(n_steps, 1), host_ms_per_step=1e3 * host_s / max(n_steps, 1),
        head_ms_per_step=1e3 * head_s / max(n_steps, 1),
        latency_curves={who: e.latency_curves() for who, e in (("target", gen.engine), ("draft", gen.draft))
                        if e is not None and e.latency_curves()})
    if bandwidth and "decode" in steps:
        rows = 2 * batch_size if sampling.uses_cfg else batch_size
        cache_precision = precision_of(gen.engine.cache_dtype)
        b = step_bytes(gen.spec, precision, cache_precision, rows, mean_live_tokens(gen.spec))
        floor_ms = floor_seconds(b.total, bandwidth) * 1e3
        out.bandwidth = {"bytes_per_decode_step": b.total, "weight_bytes": b.weights, "kv_bytes": b.kv,
                         "copy_bandwidth_gbps": bandwidth / 1e9, "floor_ms": floor_ms,
                         "decode_p50_ms": steps["decode"]["p50_ms"], "fraction_of_floor": floor_ms / steps["decode"]["p50_ms"]}
    return out
