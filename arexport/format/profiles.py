"""TensorRT optimization profiles recorded in the manifest: which (label, batch, q) each covers.

A step graph's profiles come from its step-kind declaration (format.stepkinds); the builder
writes them (arexport.exporter.trt_build) and the TensorRT runner picks one per call.
"""

from __future__ import annotations

from typing import Any, Union

from arexport.errors import ArexportError
from arexport.format.stepkinds import StepKind, get_step_kind


def step_profiles(batch_sizes: list[int], max_q: int, kind: Union[str, StepKind] = "token",
                  exact_sizes: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """Profiles of a step graph as its declaration states them, each covering every batch of 1..max
    rows (the scheduler's live rows change from step to step), tuned for the largest batch size given;
    `exact_sizes` are the query sizes the family gives a profile of their own (VAR's scales)."""
    return get_step_kind(kind).trt_profiles(max(batch_sizes), max_q, tuple(exact_sizes))


def graph_profiles(name: str, batch_sizes: list[int]) -> list[dict[str, Any]]:
    """Graphs without a query length (image decoders, next-scale inputs): one profile for 1..max rows."""
    top = max(batch_sizes)
    return [{"kind": name, "batch": [1, top, top], "q": [0, 0, 0]}]


def select_profile(profiles: list[dict[str, Any]], labels: Union[str, tuple[str, ...]], batch: int, q: int) -> int:
    """Index of the first profile whose label is one of `labels` and whose ranges hold (batch, q), or
    ArexportError listing what the plan has."""
    labels = (labels,) if isinstance(labels, str) else tuple(labels)
    for i, p in enumerate(profiles):
        if p["kind"] in labels and p["batch"][0] <= batch <= p["batch"][2] and p["q"][0] <= q <= p["q"][2]:
            return i
    have = ", ".join(f"{p['kind']} batch {p['batch'][0]}-{p['batch'][2]} q {p['q'][0]}-{p['q'][2]}" for p in profiles)
    raise ArexportError(f"no TensorRT profile for {'/'.join(labels)} with batch {batch}, q {q}; the plan has: {have}")
