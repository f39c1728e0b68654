"""Admission control for the serving worker (issue 38, item 4): admit what can finish, refuse the rest at once.

A request of `cost` images (GridAR / best-of-N candidates counted) is refused before it is queued:
* `too_large` (an ArexportError, HTTP 400): more images than the bound on outstanding work;
* `overloaded` (`Overloaded`, HTTP 429): queued + running images plus its own exceed the bound;
* `deadline` (`DeadlineUnreachable`, HTTP 503): its estimated finish is later than `margin` of its
  timeout.

The finish estimate comes from the worker's measured throughput, never from a guess per method:
* rate R: images finished per busy wall second (decaying sums of images and seconds, half-life
  `half_life_s` busy seconds), so it follows the methods and sizes actually being served;
* occupancy L: images live in the batches, averaged over the same seconds;
* an image's time in a batch T = L / R (Little's law);
* requests with a timeout run first come, first served (service.py `_fairness`), so a new request
  has every outstanding image ahead of it. With `slots` images running at once its last image
  starts once max(0, ahead + cost - slots) images have finished, and runs T:
      finish = max(0, ahead + cost - slots) / R + T.
  A full batch has R = slots / T, so this is (ahead + cost) / R, the time to drain the queue; with
  free slots it is T, not a fraction of it.
Units: seconds, images. Retry-After is the time the outstanding work takes to drain, 1 .. 60 s.

Under a sustained overload of k times the throughput, at most 1/k of the offered requests can
finish in time whatever is admitted; this module's job is that the admitted ones do, and that
nothing else waits (benchmarks/overload.py measures both; docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Optional

from arexport.errors import ArexportError

DEADLINE_MARGIN = 0.8  # admit a timed request only when its estimated finish is within this share of the timeout
RATE_HALF_LIFE_S = 2.0  # busy seconds over which the throughput estimate forgets half its past
MIN_MEASURED_S = 0.02  # busy seconds measured before the estimate is trusted (until then: admit)


class ServiceClosed(ArexportError):
    """The service is shutting down and takes no (more) work."""


class Overloaded(ServiceClosed):
    """Refused before queueing: the bound on outstanding work is reached (HTTP 429)."""

    def __init__(self, msg: str, retry_after: float):
        super().__init__(msg)
        self.retry_after = retry_after


class DeadlineUnreachable(Overloaded):
    """Refused before queueing: the work ahead cannot finish before this request's deadline (HTTP 503)."""


class Admission:
    """The bound and the throughput estimate. `check` is called under the service's lock with the
    images outstanding (queued or running) at that moment; `observe` after each worker turn."""

    def __init__(self, max_outstanding: int, slots: int, metrics, margin: float = DEADLINE_MARGIN,
                 half_life_s: float = RATE_HALF_LIFE_S):
        if not 0 < margin <= 1:
            raise ArexportError(f"the deadline margin must be in (0, 1], got {margin}")
        self.max_outstanding, self.slots, self.metrics = max_outstanding, slots, metrics
        self.margin, self.half_life_s = margin, half_life_s
        self._images = 0.0  # decaying sum of images finished
        self._seconds = 0.0  # decaying sum of busy wall seconds
        self._live = 0.0  # decaying sum of live images x seconds

    # -- the estimate --------------------------------------------------------------------------------
    def observe(self, seconds: float, images: int, live: int) -> None:
        """A worker turn of `seconds` (wall, everything included) finished `images` images while
        `live` images were in the batches."""
        if seconds <= 0:
            return
        decay = 0.5 ** (seconds / self.half_life_s)
        self._images = self._images * decay + images
        self._seconds = self._seconds * decay + seconds
        self._live = self._live * decay + live * seconds

    @property
    def rate(self) -> Optional[float]:
        """Images finished per busy second, or None before enough was measured."""
        if self._images <= 0 or self._seconds <= MIN_MEASURED_S:
            return None
        return self._images / self._seconds

    @property
    def image_seconds(self) -> Optional[float]:
        """T: the seconds an image spends in a batch (mean occupancy over the rate), or None."""
        rate = self.rate
        return None if rate is None else (self._live / self._seconds) / rate

    def finish_s(self, ahead: int, cost: int) -> Optional[float]:
        """Estimated seconds until the last of `cost` new images finishes behind `ahead` images, or
        None before the throughput is measured."""
        rate = self.rate
        if rate is None:
            return None
        return max(0, ahead + cost - self.slots) / rate + self.image_seconds

    def retry_after(self, outstanding: int) -> float:
        rate = self.rate
        return min(60.0, max(1.0, outstanding / rate if rate else 1.0))

    # -- the decision --------------------------------------------------------------------------------
    def check(self, cost: int, timeout: Optional[float], outstanding: int) -> None:
        """Raise when a request of `cost` images with `timeout` seconds (None: no deadline) is refused."""
        if cost > self.max_outstanding:
            self.metrics.rejected.labels("too_large").inc()
            raise ArexportError(f"the request asks for {cost} images (candidates included); this server runs at most "
                                f"{self.max_outstanding} at a time")
        if outstanding + cost > self.max_outstanding:
            self.metrics.rejected.labels("overloaded").inc()
            raise Overloaded(f"server busy: {outstanding} images queued or running, the limit is "
                             f"{self.max_outstanding}; retry later", self.retry_after(outstanding))
        finish = None if timeout is None else self.finish_s(outstanding, cost)
        if finish is not None and finish > self.margin * timeout:
            self.metrics.rejected.labels("deadline").inc()
            raise DeadlineUnreachable(f"the request cannot finish within its {timeout:g} s timeout: {outstanding} images are "
                                      f"ahead of it at about {self.rate:.1f} images/s and {self.image_seconds:.2f} s per image "
                                      f"(about {finish:.1f} s)", self.retry_after(outstanding))
