"""TensorRT optimization profiles recorded in the manifest: which (step kind, batch, q) each covers.

The builder writes them (arexport.exporter.trt_build) and the TensorRT runner picks one per call.
"""

from __future__ import annotations

from typing import Any, Optional

from arexport.errors import ArexportError


def step_profiles(batch_sizes: list[int], verify_len: int, kinds: tuple[str, ...] = ("decode", "verify"),
                  scale_sizes: Optional[list[int]] = None) -> list[dict[str, Any]]:
    """Profiles of the step plan, one per step kind, each covering every batch of 1..max rows (the
    scheduler's live rows change from step to step), tuned for the largest batch size given:
    `decode` is q = 1, `verify` q in [2, K]; ARPG's `multi_query` has new tokens q and queries m in [1, K];
    VAR's `scale` has one profile per scale size (q = pn * pn exactly) and one for any q up to K
    (blocks padded to a batch's largest scale, a CoDe refiner's first step)."""
    top = max(batch_sizes)
    if "scale" in kinds:
        sizes = sorted(set(scale_sizes or []))
        out = [{"kind": "scale", "batch": [1, top, top], "q": [s, s, s]} for s in sizes if s <= verify_len]
        return out + [{"kind": "scale", "batch": [1, top, top], "q": [1, max(sizes or [1]), verify_len]}]
    if "multi_query" in kinds:
        opt = max(1, verify_len // 8)
        return [{"kind": "multi_query", "batch": [1, top, top], "q": [1, opt, verify_len], "m": [1, opt, verify_len]}]
    out = [{"kind": "decode", "batch": [1, top, top], "q": [1, 1, 1]}]
    if verify_len > 1:
        out.append({"kind": "verify", "batch": [1, top, top], "q": [2, verify_len, verify_len]})
    return out


def graph_profiles(name: str, batch_sizes: list[int]) -> list[dict[str, Any]]:
    """Prefill and image decoder: one profile for 1..max rows."""
    top = max(batch_sizes)
    return [{"kind": name, "batch": [1, top, top], "q": [0, 0, 0]}]


def select_profile(profiles: list[dict[str, Any]], kind: str, batch: int, q: int) -> int:
    """Index of the profile serving a call, or ArexportError listing what the plan has."""
    for i, p in enumerate(profiles):
        b_ok = p["batch"][0] <= batch <= p["batch"][2]
        if not b_ok:
            continue
        if p["kind"] in ("decode", "verify"):
            if kind in ("decode", "verify") and p["q"][0] <= q <= p["q"][2]:
                return i
        elif p["kind"] == "scale":
            if kind == "scale" and p["q"][0] <= q <= p["q"][2]:
                return i
        elif p["kind"] == "multi_query":
            if kind == "multi_query":
                return i
        elif p["kind"] == kind:
            return i
    have = ", ".join(f"{p['kind']} batch {p['batch'][0]}-{p['batch'][2]} q {p['q'][0]}-{p['q'][2]}" for p in profiles)
    raise ArexportError(f"no TensorRT profile for {kind} with batch {batch}, q {q}; the plan has: {have}")
