"""Data-parallel replicas inside one process: one GenerationService per device, requests placed by load.

`ReplicaService([svc_cuda0, svc_cuda1])` has the GenerationService interface the HTTP app, the
OpenAI endpoint and the deployments use (submit, agenerate, engine, gen, metrics, load, degraded,
close, ...). Each replica owns its engine, its worker thread and its lanes; a request goes whole
to the replica with the fewest outstanding images (queued + running; ties: the lower index), and
when that one refuses it (its bound or its deadline estimate), to the next least loaded; only when
every replica refuses is the request refused, with the refusal of the least loaded one.

A request runs on one replica from start to end with its own seed stream, and every replica runs
the same engine kind on the same kind of device, so its tokens are those of the same request on a
single service (tests/test_serving_multi_device.py runs it under concurrency on two CPU
"devices"). Latency model (README "Scaling out"): replicas add throughput, never
speed up one request; with r replicas each running its own batch of b images, a request's latency
is a single device's at the load each replica sees (offered load / r).

Counters (requests, images, forwards, HTTP statuses) are shared by every replica; the gauges
(queue depth, outstanding images, lanes, their bytes) are summed over the replicas when scraped.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Optional, Sequence

from arexport.errors import ArexportError
from arexport.serving.admission import Overloaded, ServiceClosed
from arexport.serving.metrics import Metrics


class ReplicaMetrics(Metrics):
    """One registry for every replica: counters shared, gauges summed over the replicas at scrape."""

    def __init__(self):
        super().__init__()
        self.replicas: list = []

    def render(self) -> bytes:
        if self.replicas:
            self.outstanding.set(sum(s.load["outstanding_images"] for s in self.replicas))
            self.queue_depth.set(sum(s.queue_depth for s in self.replicas))
            self.lanes.set(sum(s.load["lanes"] for s in self.replicas))
            self.lane_bytes.set(sum(s.lane_bytes() for s in self.replicas))
        return super().render()


class ReplicaService:
    """Several GenerationServices (one per device) behind one submit (see module docstring). Build it
    with `ReplicaService.open(make, devices)` so the replicas share one ReplicaMetrics."""

    def __init__(self, replicas: Sequence, metrics: ReplicaMetrics):
        self.replicas = list(replicas)
        if not self.replicas:
            raise ArexportError("a replica set needs at least one replica")
        spec = self.replicas[0].engine.spec
        for s in self.replicas[1:]:
            if s.engine.spec != spec or s.engine.backend != self.replicas[0].engine.backend:
                raise ArexportError("every replica must run the same model on the same backend")
        self.metrics = metrics
        metrics.replicas = self.replicas
        self.placed = [0] * len(self.replicas)  # requests placed on each replica (tests, /healthz)

    @classmethod
    def open(cls, make, devices: Sequence[str]) -> "ReplicaService":
        """make(device, metrics) -> a GenerationService on that device, once per device."""
        metrics = ReplicaMetrics()
        services = []
        try:
            for d in devices:
                services.append(make(d, metrics))
        except BaseException:
            for s in services:
                s.close(drain=False)
            raise
        return cls(services, metrics)

    # -- what callers use (the GenerationService interface) -----------------------------------------
    @property
    def engine(self):
        return self.replicas[0].engine

    @property
    def gen(self):
        """The first replica's Generator: request checks (methods, sampling, conditions) are the same on all."""
        return self.replicas[0].gen

    @property
    def batching(self) -> str:
        return self.replicas[0].batching

    @property
    def max_outstanding(self) -> int:
        return sum(s.max_outstanding for s in self.replicas)

    def order(self) -> list[int]:
        """Replica indices, least loaded first (outstanding images; ties: lower index)."""
        return sorted(range(len(self.replicas)), key=lambda i: (self.replicas[i].outstanding, i))

    def submit(self, classes=None, **kw) -> Future:
        """Place the request on the least loaded replica that admits it; raise the least loaded one's
        refusal when none does. Bad input raises ArexportError before any replica queues anything."""
        first: Optional[Exception] = None
        for i in self.order():
            try:
                fut = self.replicas[i].submit(classes, **kw)
            except Overloaded as e:  # this replica's bound or deadline estimate: try the next
                first = first or e
                continue
            self.placed[i] += 1
            return fut
        raise first if first is not None else ServiceClosed("no replica")

    def precheck(self, cost: int, timeout) -> None:
        """Raise when every replica would refuse a request of at least `cost` images (the least loaded
        one's refusal); see GenerationService.precheck."""
        first: Optional[Exception] = None
        for i in self.order():
            try:
                return self.replicas[i].precheck(cost, timeout)
            except Overloaded as e:
                first = first or e
        raise first

    def generate(self, classes, **kw):
        timeout = kw.get("timeout")
        return self.submit(classes, **kw).result(timeout=None if timeout is None else timeout + 60)

    async def agenerate(self, classes, **kw):
        return await asyncio.wrap_future(self.submit(classes, **kw))

    def default_sampling(self):
        return self.gen.sampling_params()

    @property
    def load(self) -> dict:
        each = [s.load for s in self.replicas]
        out = {k: sum(x[k] for x in each) for k in ("outstanding_images", "max_outstanding_images", "lanes", "max_lanes",
                                                     "lane_bytes", "waiting_for_lane")}
        out["resident_bytes"] = each[0]["resident_bytes"]  # one process
        out["replicas"] = [dict(x, device=str(s.engine.device), placed=n) for x, s, n in zip(each, self.replicas, self.placed)]
        return out

    def degraded(self) -> list[str]:
        """A replica's reasons, prefixed with its device (the service is degraded when any replica is)."""
        return [f"{s.engine.device} #{i}: {r}" for i, s in enumerate(self.replicas) for r in s.degraded()]

    def lane_bytes(self) -> int:
        return sum(s.lane_bytes() for s in self.replicas)

    @property
    def closed(self) -> bool:
        return any(s.closed for s in self.replicas)

    @property
    def healthy(self) -> bool:
        return all(s.healthy for s in self.replicas)

    def close(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        for s in self.replicas:  # stop every replica taking work first, then wait for each
            s.close(drain=drain, timeout=0)
        for s in self.replicas:
            s.wait_closed(timeout)

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        return all([s.wait_closed(timeout) for s in self.replicas])
