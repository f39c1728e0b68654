"""Throughput across batch sizes against the read floor (`arexport profile --batch-sweep`, issue 35).

For each batch size (images per batch; CFG doubles the rows) and each method, one `profile_generator`
run gives: the engine's mean time per forward (`step_ms`), images per second, and the bytes one step
must read (weights once per step plus every row's live K/V at the image's mean live length,
profiling.bandwidth) over the copy bandwidth measured in the same run: the floor and the fraction of
it reached (floor / step, 1 = at the floor). A method "stops paying" at the first batch size where its
images per second fall to `ar`'s or below (speculation's benefit shrinks with the batch, since a verify
step of K queries costs more than a decode step once the step is no longer weight-bound).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

from arexport.devices import precision_of
from arexport.errors import ArexportError
from arexport.profiling.bandwidth import floor_seconds, mean_live_tokens, step_bytes

MAX_SWEEP_BATCH = 4096  # images per batch: a larger value is a typo, not a benchmark


@dataclass
class SweepRow:
    """One (method, batch size) point of a sweep."""

    label: str
    method: str
    images: int  # images per batch
    rows: int  # engine rows (2 x images with CFG)
    step_ms: float  # engine time per forward (every step kind the method runs), mean over the timed repeats
    images_per_s: float
    forwards_per_image: float
    bytes_per_step: float  # weights once + rows x live K/V at the mean live length
    floor_ms: Optional[float]  # bytes_per_step / copy bandwidth (None without a bandwidth)
    fraction_of_floor: Optional[float]  # floor_ms / step_ms
    vs_ar: Optional[float] = None  # images/s over ar's at the same batch size (None: no ar in the sweep)

    def as_dict(self) -> dict:
        return asdict(self)


def parse_batches(text: str) -> list[int]:
    """'1,8,32,128' -> [1, 8, 32, 128]; ArexportError on anything but positive sizes <= MAX_SWEEP_BATCH."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ArexportError(f"--batch-sweep takes comma-separated image counts such as 1,8,32,128, got {text!r}") from None
    if not sizes or any(s < 1 or s > MAX_SWEEP_BATCH for s in sizes):
        raise ArexportError(f"--batch-sweep sizes must be 1..{MAX_SWEEP_BATCH} images, got {text!r}")
    return sorted(set(sizes))


def sweep_point(gen, result, images: int, uses_cfg: bool, precision: str, bandwidth: Optional[float]) -> SweepRow:
    """A SweepRow from one ProfileResult (profiling.profiler) of `images` images per batch."""
    rows = images * (2 if uses_cfg else 1)
    b = step_bytes(gen.spec, precision, precision_of(gen.engine.cache_dtype), rows, mean_live_tokens(gen.spec)).total
    floor_ms = floor_seconds(b, bandwidth) * 1e3 if bandwidth else None
    step = result.engine_ms_per_step
    return SweepRow(result.label, result.method, images, rows, step, result.images_per_s, result.target_forwards_per_image,
                    b, floor_ms, (floor_ms / step) if floor_ms and step > 0 else None)


def run_sweep(points: list[tuple[int, object]], run: Callable[[int, object], SweepRow]) -> list[SweepRow]:
    """`run(images, config)` for every (batch size, config) point, then each row's images/s over the `ar`
    row of the same batch size (the first config whose method is ar)."""
    rows = [run(images, cfg) for images, cfg in points]
    for r in rows:
        ar = next((x for x in rows if x.images == r.images and x.method == "ar"), None)
        r.vs_ar = r.images_per_s / ar.images_per_s if ar is not None and ar.images_per_s > 0 else None
    return rows


def stops_paying(rows: list[SweepRow]) -> dict[str, Optional[int]]:
    """Per non-ar method: the smallest batch size at which its images/s are no better than ar's (None: it
    pays at every batch size swept, or there is no ar to compare with)."""
    out: dict[str, Optional[int]] = {}
    for label in dict.fromkeys(r.label for r in rows if r.method != "ar"):
        mine = sorted((r for r in rows if r.label == label and r.vs_ar is not None), key=lambda r: r.images)
        out[label] = next((r.images for r in mine if r.vs_ar <= 1.0), None)
    return out


def sweep_lines(rows: list[SweepRow]) -> list[str]:
    """The sweep as a markdown table plus one 'stops paying' line per method."""
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    out = ["| method | images | rows | step ms | images/s | forwards/image | MB read/step | floor ms | fraction of floor | vs ar |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.label} | {r.images} | {r.rows} | {r.step_ms:.3f} | {r.images_per_s:.2f} | {r.forwards_per_image:.1f} | "
                   f"{r.bytes_per_step / 1e6:.1f} | {f(r.floor_ms, '.3f')} | {f(r.fraction_of_floor, '.2f')} | {f(r.vs_ar, '.2f')}x |")
    for label, batch in stops_paying(rows).items():
        has_ar = any(r.vs_ar is not None for r in rows if r.label == label)
        out.append(f"{label}: " + ("no ar in the sweep to compare with" if not has_ar else
                                   f"no faster than ar from {batch} image(s) per batch on" if batch else
                                   "faster than ar at every batch size swept"))
    return out
