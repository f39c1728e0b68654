"""Typed statistics of a generation run, aggregated from each image's RowStats."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from arexport.runtime.methods.base import RowStats


def percentiles(values: Sequence[float], qs=(50, 90, 99)) -> dict[str, float]:
    """{'p50': .., 'p90': .., 'p99': ..} by linear interpolation (numpy's default); empty -> {}."""
    if len(values) == 0:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


def latency_table(engines: dict[str, Any]) -> dict[str, dict[str, float]]:
    """'target.decode' -> count, mean and percentiles in ms of an engine's timed calls, per step kind; an EAGLE
    draft head's calls (timed into the target's records) as 'head.draft_head'."""
    from arexport.runtime.engine import HEAD_RECORD

    out: dict[str, dict[str, float]] = {}
    for who, e in engines.items():
        for k in sorted({r.kind for r in e.records}):
            ms = [r.seconds * 1e3 for r in e.records if r.kind == k]
            out[f"{'head' if k == HEAD_RECORD else who}.{k}"] = {"count": len(ms), "mean_ms": float(np.mean(ms)), **{f"{q}_ms": v for q, v in percentiles(ms).items()}}
    return out


@dataclass
class RunStats:
    """What `--stats-json` writes (see README: Statistics)."""

    images: int
    batches: int  # admission waves: boundaries at which images joined the batch
    tokens_per_image: int
    target_forwards: int  # target engine calls over the run (a batched call counts once)
    draft_forwards: int
    seconds: float
    seconds_per_image: float
    backend: str
    device: str
    calls: dict[str, int]
    target_forwards_per_image: float  # engine calls an image took part in (prefill included), mean over images
    forwards_per_image_alone: float  # the same number: what one image costs whatever it was batched with
    step_compression: float  # tokens per image / target forwards per image
    draft_forwards_per_image: float
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    mean_accepted_length: Optional[float] = None
    accepted_length_histogram: Optional[dict[int, int]] = None
    method: dict[str, Any] = field(default_factory=dict)  # the method's own fields (RowStats.run_fields)

    def as_dict(self) -> dict[str, Any]:
        """Flat: the method's own fields sit beside the shared ones (skipped_rounds, gridar_*, ...)."""
        out = {k: v for k, v in asdict(self).items() if v is not None and k != "method"}
        return {**out, **self.method}

    @classmethod
    def aggregate(cls, rows: list[RowStats], n_tokens: int, engines: dict[str, Any], seconds: float, batches: int,
                  events: dict[str, int]) -> "RunStats":
        n = len(rows)
        target, draft = engines["target"], engines.get("draft")
        fwd = float(np.mean([r.forwards for r in rows])) if rows else 0.0
        acc = [a for r in rows for a in r.accepted]
        out = cls(
            images=n, batches=batches, tokens_per_image=n_tokens, target_forwards=target.forward_count(),
            draft_forwards=draft.forward_count() if draft is not None else 0, seconds=seconds,
            seconds_per_image=seconds / n if n else 0.0, backend=target.backend, device=str(target.device),
            calls=dict(target.calls), target_forwards_per_image=fwd, forwards_per_image_alone=fwd,
            step_compression=n_tokens / fwd if fwd else 0.0,
            draft_forwards_per_image=float(np.mean([r.draft_forwards for r in rows])) if rows else 0.0,
            latency=latency_table({k: e for k, e in engines.items() if e is not None}))
        if acc:
            out.mean_accepted_length = float(np.mean(acc))
            values, counts = np.unique(np.asarray(acc), return_counts=True)
            out.accepted_length_histogram = {int(v): int(c) for v, c in zip(values, counts)}
        if rows:  # the method's own statistics, through its RowStats class's one hook
            out.method = type(rows[0]).run_fields(rows, events, fwd)
        return out
