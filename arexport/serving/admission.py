"""Admission control for the serving worker (issue 38, item 4): admit what can finish, refuse the rest at once.

A request of `cost` images (GridAR / best-of-N candidates counted) is refused before it is queued:
* `too_large` (an ArexportError, HTTP 400): more images than the bound on outstanding work;
* `overloaded` (`Overloaded`, HTTP 429): queued + running images plus its own exceed the bound;
* `deadline` (`DeadlineUnreachable`, HTTP 503): its estimated finish is later than `margin` of its
  timeout.

The finish estimate comes from the worker's measured turns, never from a guess per method. Each
turn (one step of every busy lane) is recorded as (wall seconds, images live in it, images finished),
in decaying sums (half-life `half_life_s` busy seconds), so it follows what is being served:
* K: turns an image stays in a batch = live images summed over turns / images finished;
* s(b) = a + c b: a turn's seconds with b live images, a weighted least-squares line through the
  turns. A GPU step costs about the same for any batch (c ~ 0: an image takes as long alone as in a
  full batch), a CPU step about in proportion to it (a ~ 0: throughput is the same at any batch,
  so a request alone finishes sooner). Until the occupancy has varied enough to fit a line, the
  proportional line through the mean is used (the throughput-only estimate this module replaced);
* an image in a batch of b takes T(b) = K s(b); b images finish at R(b) = b / T(b) per second;
* requests with a timeout run first come, first served (service.py `_fairness`), so a new request
  of `cost` images has every outstanding image ahead of it: n = ahead + cost. With n <= slots all
  run in one batch and the last finishes after T(n); otherwise its last image starts once n - slots
  images have finished at the full batch's rate, then runs T(slots):
      finish = T(n)                             (n <= slots)
      finish = (n - slots) / R(slots) + T(slots) (n > slots)
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
        # decaying sums over turns: weight, busy seconds, live images, live^2, live x seconds, images finished
        self._w = self._seconds = self._live = self._live2 = self._live_s = self._images = 0.0

    # -- the estimate --------------------------------------------------------------------------------
    def observe(self, seconds: float, images: int, live: int) -> None:
        """A worker turn of `seconds` (wall, everything included) with `live` images in its steps, of
        which `images` finished."""
        if seconds <= 0 or live <= 0:
            return
        d = 0.5 ** (seconds / self.half_life_s)
        self._w = self._w * d + 1.0
        self._seconds = self._seconds * d + seconds
        self._live = self._live * d + live
        self._live2 = self._live2 * d + live * live
        self._live_s = self._live_s * d + live * seconds
        self._images = self._images * d + images

    def _line(self) -> tuple[float, float]:
        """(a, c): a turn's seconds with b live images is a + c b (both >= 0)."""
        w, sb, sbb, ss, sbs = self._w, self._live, self._live2, self._seconds, self._live_s
        var = w * sbb - sb * sb  # w^2 x the variance of b
        mean_b, mean_s = sb / w, ss / w
        if var <= (0.05 * mean_b * w) ** 2:  # occupancy barely varied (sd < 5% of the mean): proportional
            return 0.0, mean_s / mean_b
        c = (w * sbs - sb * ss) / var
        a = (ss - c * sb) / w
        if c < 0:
            return mean_s, 0.0
        if a < 0:
            return 0.0, mean_s / mean_b
        return a, c

    def image_seconds(self, b: int) -> Optional[float]:
        """T(b): seconds an image spends in a batch of b live images, or None before any was measured."""
        if self._images <= 0 or self._seconds <= MIN_MEASURED_S:
            return None
        a, c = self._line()
        return (self._live / self._images) * (a + c * b)

    @property
    def rate(self) -> Optional[float]:
        """Images finished per second with a full batch, or None before enough was measured."""
        t = self.image_seconds(self.slots)
        return None if t is None else self.slots / t

    def finish_s(self, ahead: int, cost: int) -> Optional[float]:
        """Estimated seconds until the last of `cost` new images finishes behind `ahead` images, or
        None before the throughput is measured."""
        n = ahead + cost
        if n <= self.slots:
            return self.image_seconds(n)
        t = self.image_seconds(self.slots)
        return None if t is None else (n - self.slots) / (self.slots / t) + t

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
                                      f"ahead of it at about {self.rate:.1f} images/s, an image taking about "
                                      f"{self.image_seconds(min(self.slots, outstanding + cost)):.2f} s in its batch "
                                      f"(about {finish:.1f} s)", self.retry_after(outstanding))
