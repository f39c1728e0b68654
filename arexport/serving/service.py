"""GenerationService: the embeddable, thread- and asyncio-safe front end of a serving process.

Callers `submit()` requests from any thread (or `await agenerate()` from asyncio); one worker thread
owns the engine and drives the runtime's public step-wise API (`arexport.runtime.Session`, the one
`Generator.generate` runs), one step at a time, for every method:
* `continuous` (default) — one session (lane) per method and options; a request's images join its
  static batch at the next step boundary whenever slots are free (step-level batching);
* `request` — compatible queued requests (same method and options) are merged into one batch of up
  to `max_batch` images, which runs to the end before the next group starts;
* `none` — one request at a time.
Sampling (temperature, top-k/p, guidance scale and schedule, seed) is per image, so requests that
differ only in sampling share a lane; a method and options get a second lane only for an image its
batch cannot hold (guided next to unguided: `Session.shares`). Every image keeps its own seed,
lengths and windows, so a request's output does not depend on what it was batched with,
speculative methods included. Requests carry an optional timeout and can be cancelled;
`close(drain=True)` finishes queued work, `close(drain=False)` rejects it with `ServiceClosed` —
nothing is dropped silently.

Bounded work (admission control): queued + running images (GridAR / best-of-N candidates count
each) never exceed `max_outstanding`; beyond it `submit` raises `Overloaded` at once. A request
with a timeout is refused at once (`DeadlineUnreachable`) when the measured throughput says the
work ahead of it plus its own cannot finish in time. A cancelled request (a client that went away)
has its images dropped from their batch at the next step. Lanes are at most `max_lanes`; idle
ones are evicted (least recently used first, and any idle for `lane_idle_s`), and a request whose
lane cannot be made yet waits for one. Their KV-cache bytes and the process's resident memory are
in /metrics.

This module uses only what `arexport.runtime` exports (an import-linter contract holds it).
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from arexport.budget import budget_bytes, check as check_budget, kv_cache_bytes, rss_bytes
from arexport.errors import ArexportError
from arexport.runtime import Conditions, Generator, SamplingParams, Session, decode_finished
from arexport.serving.admission import Admission, DeadlineUnreachable, Overloaded, ServiceClosed  # noqa: F401 (re-exported)
from arexport.serving.metrics import Metrics

MODES = ("continuous", "request", "none")
MAX_BATCH = 4096  # images per lane batch; the memory budget usually binds first
DEFAULT_OUTSTANDING_BATCHES = 64  # default bound on outstanding images: this many full batches
MAX_TIMEOUT_S = 86400.0
DEGRADED_FRACTION = 0.8  # /healthz says degraded at this fraction of a bound


class RequestTimeout(ArexportError):
    """A request did not finish within its timeout."""


@dataclass(eq=False)  # requests are compared by identity: their fields hold tensors
class Request:
    conds: Conditions
    method: object  # a validated Method (Generator.method / request_method)
    sampling: SamplingParams
    seed: int = 0
    images: bool = True
    timeout: Optional[float] = None
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)
    results: dict = field(default_factory=dict)  # image index -> the session's finished result (tokens, latents)

    @property
    def n(self) -> int:
        return len(self.conds)

    @property
    def cost(self) -> int:
        """Images this request generates (GridAR / best-of-N generate every candidate)."""
        return self.n * int(getattr(self.method.options, "candidates", 1) or 1)

    @property
    def key(self) -> tuple:
        """Requests with the same key may share a lane: same method and options (sampling is per image)."""
        return (self.method.name, repr(self.method.options))

    @property
    def group(self):
        """Admission group in its session: requests with a timeout run first come, first served among
        themselves (the order admission control's finish estimate assumes, so an admitted request is
        not pushed past its deadline by later ones); others round robin (None: each its own group),
        so a large request cannot hold every slot while a small one waits."""
        return "deadline" if self.timeout is not None else None

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now > self.submitted + self.timeout


@dataclass(eq=False)
class Lane:
    """One session (a static batch of max_batch image slots) and the requests added to it."""

    key: tuple  # Request.key
    session: Session
    requests: dict = field(default_factory=dict)  # session handle -> Request
    used: float = field(default_factory=time.monotonic)  # last time it stepped or took a request

    @property
    def idle(self) -> bool:
        return self.session.is_done()


@dataclass
class Response:
    tokens: np.ndarray  # [N, n_tokens]
    images: Optional[np.ndarray]  # uint8 [N, H, W, 3]
    seconds: float


class GenerationService:
    """See module docstring."""

    def __init__(self, generator: Generator, batching: str = "continuous", max_batch: int = 8, metrics: Optional[Metrics] = None,
                 max_queue: int = 1024, max_outstanding: Optional[int] = None, max_lanes: int = 8,
                 lane_idle_s: float = 30.0):
        if batching not in MODES:
            raise ArexportError(f"batching must be one of {', '.join(MODES)}, got {batching!r}")
        if not 1 <= max_batch <= MAX_BATCH:
            raise ArexportError(f"max batch must be in 1..{MAX_BATCH} images, got {max_batch}")
        if max_lanes < 1:
            raise ArexportError(f"max lanes must be >= 1, got {max_lanes}")
        self.gen = generator
        self.engine = generator.engine
        self.batching = batching
        self.max_batch = max_batch
        self.max_lanes = max_lanes
        self.lane_idle_s = lane_idle_s
        self.max_outstanding = max_outstanding or DEFAULT_OUTSTANDING_BATCHES * max_batch
        spec = self.engine.spec
        self.lane_estimate = kv_cache_bytes(spec, 2 * max_batch, itemsize=4)  # CFG: two rows per image
        check_budget(f"serving with max batch {max_batch} in up to {max_lanes} lanes",
                     max_lanes * self.lane_estimate, getattr(self.engine, "device", None),
                     "use a smaller --max-batch or fewer --max-lanes")
        self.metrics = metrics or Metrics()
        self._outstanding = 0  # images queued or running (admission control)
        self.admission = Admission(self.max_outstanding, max_batch, self.metrics)  # bound + throughput estimate
        self.waiting_for_lane = 0
        self._turn_images = 0
        self._last_turn: Optional[float] = None
        self._queue: "queue.Queue[Request]" = queue.Queue(maxsize=max_queue)
        self._pending: list[Request] = []  # taken from the queue, not yet given to a lane
        self._lanes: list[Lane] = []
        self._closing = False
        self._drain = True
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="arexport-worker", daemon=True)
        self._worker.start()

    # -- public API ---------------------------------------------------------------------------------
    def submit(self, classes=None, method: Optional[str] = None, options: Optional[dict] = None,
               sampling: Optional[SamplingParams] = None, seed: int = 0, images: bool = True,
               timeout: Optional[float] = None, captions=None, caption_mask=None, prompts=None) -> Future:
        """Queue a request (class ids, or caption features for t2i); the Future resolves to a Response.
        Bad input raises ArexportError here, in the caller's thread, before anything is queued."""
        conds = self.gen.conditions(classes, captions, caption_mask, prompts)
        m = self.gen.method(method, options)  # trusted caller (HTTP checks its requests with request_method)
        sampling = self.gen.resolve_sampling(sampling)  # None: the model's sampler, as generate and the CLI
        if timeout is not None and not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT_S):
            raise ArexportError(f"timeout must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {timeout}")
        req = Request(conds, m, sampling, int(seed), images, timeout)
        cost = req.cost
        with self._lock:
            if self._closing:
                self.metrics.rejected.labels("closed").inc()
                raise ServiceClosed("the service is shutting down")
            self._admission(cost, timeout)
            try:
                self._queue.put_nowait(req)
            except queue.Full:
                self.metrics.rejected.labels("queue_full").inc()
                raise Overloaded("the request queue is full; retry later", 1.0) from None
            self._outstanding += cost
        req.future.add_done_callback(lambda f, r=req: self._settled(r))
        self.metrics.queue_depth.set(self._queue.qsize() + len(self._pending))
        self.metrics.outstanding.set(self._outstanding)
        return req.future

    def precheck(self, cost: int, timeout: Optional[float]) -> None:
        """Raise the refusal `submit` would give a request of at least `cost` images with `timeout`
        right now (ServiceClosed, Overloaded, DeadlineUnreachable; ArexportError when it is larger than
        the bound), counted in /metrics; queue nothing. The HTTP layer calls it before parsing a body
        (serving/early.py)."""
        with self._lock:
            if self._closing:
                self.metrics.rejected.labels("closed").inc()
                raise ServiceClosed("the service is shutting down")
            self._admission(cost, timeout)

    def _admission(self, cost: int, timeout: Optional[float]) -> None:
        """Refuse (raise) a request of `cost` images that would exceed the bound or miss its deadline
        (serving/admission.py). Called under the lock."""
        self.admission.check(cost, timeout, self._outstanding)

    def _settled(self, r: Request) -> None:
        """A request's future resolved (result, error, timeout or cancellation): release its admission."""
        with self._lock:
            self._outstanding -= r.cost
        self.metrics.outstanding.set(self._outstanding)
        if r.future.cancelled():
            self.metrics.requests.labels(r.method.name, "cancelled").inc()

    @property
    def outstanding(self) -> int:
        """Images queued or running now (what admission bounds; replicas are placed by it)."""
        return self._outstanding

    @property
    def queue_depth(self) -> int:
        """Requests not yet given to a lane."""
        return self._queue.qsize() + len(self._pending)

    @property
    def load(self) -> dict:
        """Admission state for /healthz: outstanding images against the bound, lanes, memory."""
        try:
            free, _ = budget_bytes(getattr(self.engine, "device", None))
        except ArexportError:
            free = None
        return {"outstanding_images": self._outstanding, "max_outstanding_images": self.max_outstanding,
                "lanes": len(self._lanes), "max_lanes": self.max_lanes, "lane_bytes": self.lane_bytes(),
                "resident_bytes": rss_bytes(),
                "waiting_for_lane": self.waiting_for_lane, "memory_budget_bytes": free,
                "images_per_second": None if self.admission.rate is None else round(self.admission.rate, 3)}

    def degraded(self) -> list[str]:
        """Reasons the service is near a bound (empty when it is not)."""
        info, out = self.load, []
        if info["outstanding_images"] >= DEGRADED_FRACTION * self.max_outstanding:
            out.append(f"{info['outstanding_images']} of {self.max_outstanding} outstanding images")
        if info["memory_budget_bytes"] is not None and info["memory_budget_bytes"] < 2 * self.lane_estimate:
            out.append("memory: less than two lanes' caches left in the budget")
        if info["waiting_for_lane"]:
            out.append(f"{info['waiting_for_lane']} requests waiting for a lane")
        return out

    def lane_bytes(self) -> int:
        """Bytes held by the lanes' KV caches."""
        return sum(lane.session.memory_bytes for lane in list(self._lanes))

    def generate(self, classes, **kw) -> Response:
        """Blocking submit + wait."""
        timeout = kw.get("timeout")
        return self.submit(classes, **kw).result(timeout=None if timeout is None else timeout + 60)

    async def agenerate(self, classes, **kw) -> Response:
        """asyncio-friendly submit + await."""
        return await asyncio.wrap_future(self.submit(classes, **kw))

    def default_sampling(self) -> SamplingParams:
        return self.gen.sampling_params()

    def close(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop taking requests; finish (drain) or reject queued ones; wait for the worker."""
        with self._lock:
            self._closing, self._drain = True, drain
        self._queue.put(None)  # wake the worker
        self._worker.join(timeout)

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        """Wait for the worker to finish after close(); True when it has."""
        self._worker.join(timeout)
        return not self._worker.is_alive()

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def healthy(self) -> bool:
        """The worker is alive (it survives any error a request causes, so False means it was killed)."""
        return self._worker.is_alive()

    # -- worker ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if self._iteration():
                    return
            except BaseException as e:  # noqa: BLE001 — nothing a request's hook raises (SystemExit too) stops the worker
                self._fail_outstanding(ArexportError(f"internal error in the serving worker: {type(e).__name__}: {e}"),
                                       "error", queued=False)

    @property
    def _busy(self) -> bool:
        return any(not lane.idle for lane in self._lanes)

    def _iteration(self) -> bool:
        """One turn of the worker; True when it should exit."""
        self._take(block=not self._busy and not self._pending)
        self._evict_idle_lanes()
        if self._closing and not self._drain:
            self._fail_outstanding(ServiceClosed("the service shut down before this request ran"), "closed", queued=True)
        if self._closing and not self._pending and not self._busy and self._queue.empty():
            return True
        self._expire()
        self._dispatch()
        t0, self._turn_images = time.perf_counter(), 0
        stepped, live = False, 0
        for lane in list(self._lanes):
            if not lane.idle:
                self._step(lane)
                stepped, live = True, live + lane.session.live
        if stepped:  # wall time of the whole turn since the last one (HTTP and other threads' share included)
            now = time.perf_counter()
            self.admission.observe(now - min(t0, self._last_turn if self._last_turn is not None else t0), self._turn_images,
                                   live + self._turn_images)  # images in this turn's steps: still live + finished
            self._last_turn = now
        else:
            self._last_turn = None
        self.metrics.queue_depth.set(self._queue.qsize() + len(self._pending))
        return False

    def _take(self, block: bool) -> None:
        try:
            item = self._queue.get(timeout=0.05) if block else self._queue.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is not None:
                self._pending.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return

    def _expire(self) -> None:
        """Fail timed-out requests; drop the images of every settled request (timed out, cancelled,
        failed) from its session, so their slots are free at the next step."""
        now = time.monotonic()
        for r in self._pending + self._inflight():
            if not r.future.done() and r.expired(now):
                self._fail(r, RequestTimeout(f"request timed out after {r.timeout}s"), "timeout")
        self._pending = [r for r in self._pending if not r.future.done()]
        for lane in self._lanes:
            for h in [h for h, r in lane.requests.items() if r.future.done()]:
                lane.session.cancel(h)
                del lane.requests[h]

    def _inflight(self) -> list[Request]:
        return [r for lane in self._lanes for r in lane.requests.values()]

    def _lane(self, r: Request) -> Optional[Lane]:
        """A lane that can hold r's images (same method and options, a batch that shares its
        guidance layout), made when missing; None when max_lanes lanes are all busy (r waits)."""
        now = time.monotonic()
        for lane in self._lanes:
            if lane.key == r.key and lane.session.shares(r.sampling):
                lane.used = now
                return lane
        if len(self._lanes) >= self.max_lanes:
            idle = sorted((lane for lane in self._lanes if lane.idle), key=lambda lane: lane.used)
            if not idle:
                return None
            self._lanes.remove(idle[0])  # least recently used
        lane = Lane(r.key, self.gen.session(r.method, sampling=r.sampling, capacity=self.max_batch, images=False))
        self._lanes.append(lane)
        return lane

    def _evict_idle_lanes(self) -> None:
        now = time.monotonic()
        self._lanes = [lane for lane in self._lanes if not (lane.idle and now - lane.used > self.lane_idle_s)]
        self.metrics.lanes.set(len(self._lanes))
        self.metrics.lane_bytes.set(self.lane_bytes())

    def _dispatch(self) -> None:
        if self.batching == "continuous":
            waiting = [r for r in self._pending if not self._admit(r)]
            self._pending = waiting
            self.waiting_for_lane = len(waiting)
            return
        if self._busy or not self._pending:  # request / none: one group at a time, run to its end
            return
        r = self._pending[0]
        lane = self._new_lane_for(r)
        if lane is None:
            return
        group, n = [r], r.n
        if self.batching == "request":
            for other in self._pending[1:]:
                if other.key == r.key and n + other.n <= self.max_batch and lane.session.shares(other.sampling):
                    group.append(other)
                    n += other.n
        for g in group:
            self._add(lane, g)
        taken = {id(g) for g in group}
        self._pending = [p for p in self._pending if id(p) not in taken]

    def _new_lane_for(self, r: Request) -> Optional[Lane]:
        """r's lane, or None after failing r when no session can be opened for it."""
        try:
            return self._lane(r)
        except Exception as e:  # e.g. sampling this method cannot run, a batch over the memory budget
            self._fail(r, e if isinstance(e, ArexportError) else ArexportError(f"could not start the request: {e}"), "error")
            self._pending = [p for p in self._pending if p is not r]
            return None

    def _admit(self, r: Request) -> bool:
        """Give r's images to its lane; False when r must wait for a lane (it stays pending)."""
        try:
            lane = self._lane(r)
        except Exception as e:  # fail this request alone
            self._fail(r, e if isinstance(e, ArexportError) else ArexportError(f"could not start the request: {e}"), "error")
            return True
        if lane is None:
            return False
        self._add(lane, r)
        return True

    def _add(self, lane: Lane, r: Request) -> None:
        try:
            h = lane.session.add(conditions=r.conds, sampling=r.sampling, seed=r.seed, group=r.group)
        except Exception as e:  # e.g. an engine that cannot hold this batch: fail this request alone
            self._fail(r, e if isinstance(e, ArexportError) else ArexportError(f"could not start the request: {e}"), "error")
            return
        lane.requests[h] = r

    def _step(self, lane: Lane) -> None:
        session = lane.session
        t0 = time.perf_counter()
        before = self.engine.forward_count()
        lane.used = time.monotonic()
        try:
            session.step()
        except (Exception, SystemExit) as e:  # a step failed (a hook raised, ...): only the requests in its batch fail
            err = e if isinstance(e, ArexportError) else ArexportError(f"generation failed: {type(e).__name__}: {e}")
            running = session.running()
            for h, r in lane.requests.items():
                if h in running or r.results:
                    self._fail(r, err, "error")
                else:
                    self._pending.append(r)  # it had not started: it starts again in a fresh batch
            self._lanes.remove(lane)  # its state is unknown after an error
            return
        seconds = time.perf_counter() - t0
        self.metrics.record_step(seconds, self.engine.forward_count() - before, session.live / session.capacity)
        done = session.take()
        self._turn_images += len(done)
        for f in done:
            h, i = f.tag
            r = lane.requests.get(h)
            if r is None or r.future.done():
                continue
            r.results[i] = f
            if len(r.results) == r.n:
                del lane.requests[h]
                self._finish(r)

    def _finish(self, r: Request) -> None:
        finished = [r.results[j] for j in range(r.n)]
        try:
            images = decode_finished(self.engine, finished, r.n) if r.images else None
        except Exception as e:
            self._fail(r, e if isinstance(e, ArexportError) else ArexportError(f"image decoding failed: {e}"), "error")
            return
        tokens = np.stack([f.tokens.cpu().numpy() for f in finished])
        seconds = time.monotonic() - r.submitted
        try:
            r.future.set_result(Response(tokens, images, seconds))
        except InvalidStateError:  # cancelled meanwhile
            return
        self.metrics.latency.labels(r.method.name).observe(seconds)
        self.metrics.images.inc(r.n)
        self.metrics.requests.labels(r.method.name, "ok").inc()

    def _fail_outstanding(self, err: Exception, reason: str, queued: bool) -> None:
        """Fail every request the worker holds (pending or in a lane) and, with `queued`, those still
        in the queue. Lanes are dropped (their state is unknown after an error); new ones are made on
        demand."""
        for r in self._pending + self._inflight():
            self._fail(r, err, reason)
        self._pending.clear()
        while queued:
            try:
                r = self._queue.get_nowait()
            except queue.Empty:
                break
            if r is not None:
                self._fail(r, err, reason)
        self._lanes.clear()

    def _fail(self, r: Request, err: Exception, reason: str = "closed") -> None:
        if r.future.done():
            return
        try:
            r.future.set_exception(err)
        except InvalidStateError:
            return
        self.metrics.requests.labels(r.method.name, reason).inc()
