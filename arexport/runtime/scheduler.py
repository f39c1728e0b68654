"""The one scheduler: admits images into a decoder's free slots at step boundaries and steps it.

`Generator.generate` runs it to completion over a request's images; the serving worker keeps one
per (method, options, sampling) and admits new requests' images whenever slots are free, so every
method is continuously batched. A step is the decoder's own unit (one token, one verify block,
one draft round, one scale); nothing here knows which method it drives.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Hashable, Iterable, Optional

from arexport.runtime.methods.base import Decoder, Finished, Row


class Scheduler:
    """Admission into one decoder; `step()` returns the images that finished.

    FIFO by default. With `fair_by` (a row -> group key, e.g. its request), waiting rows are admitted
    round robin over the groups in order of arrival, so one large request cannot hold every slot
    while a small one waits behind it (an image's tokens do not depend on when it is admitted)."""

    def __init__(self, decoder: Decoder, fair_by: Optional[Callable[[Row], Hashable]] = None):
        self.decoder = decoder
        self.queue: deque[Row] = deque()
        self.admissions = 0  # boundaries at which images were admitted
        self.fair_by = fair_by

    def submit(self, rows: Iterable[Row]) -> None:
        self.queue.extend(rows)
        if self.fair_by is not None:
            groups: dict = {}
            for row in self.queue:
                groups.setdefault(self.fair_by(row), deque()).append(row)
            order = deque()
            while groups:
                for key in list(groups):
                    order.append(groups[key].popleft())
                    if not groups[key]:
                        del groups[key]
            self.queue = order

    @property
    def busy(self) -> bool:
        return bool(self.queue) or self.decoder.live > 0

    def step(self) -> list[Finished]:
        """Admit what fits, then one decoder step."""
        k = min(self.decoder.free, len(self.queue))
        if k:
            self.decoder.admit([self.queue.popleft() for _ in range(k)])
            self.admissions += 1
        return self.decoder.step()

    def drop(self, keep: Callable[[object], bool]) -> None:
        """Forget queued and running images whose tag fails keep(tag) (cancelled or expired requests);
        their slots are free at the next step."""
        self.queue = deque(r for r in self.queue if keep(r.tag))
        self.decoder.evict(keep)

    def run(self, progress: Optional[Callable[[Finished], None]] = None) -> list[Finished]:
        """Step until every submitted image finished; results in completion order."""
        out: list[Finished] = []
        while self.busy:
            for f in self.step():
                out.append(f)
                if progress:
                    progress(f)
        return out
