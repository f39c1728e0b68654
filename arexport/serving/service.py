"""GenerationService: the embeddable, thread- and asyncio-safe front end of a serving process.

Callers `submit()` requests from any thread (or `await agenerate()` from asyncio); one worker thread
owns the engine and drives the runtime's scheduler (the same one `Generator.generate` runs), one
step at a time, for every method:
* `continuous` (default) — one scheduler per (method, options, sampling); a request's images join
  its static batch at the next step boundary whenever slots are free (step-level batching);
* `request` — compatible queued requests (same method, options and sampling) are merged into one
  batch of up to `max_batch` images, which runs to the end before the next group starts;
* `none` — one request at a time.
Every image keeps its own seed, lengths and windows, so a request's output does not depend on what
it was batched with, speculative methods included. Requests carry an optional timeout and can be
cancelled; `close(drain=True)` finishes queued work, `close(drain=False)` rejects it with
`ServiceClosed` — nothing is dropped silently.

Bounded work (admission control): queued + running images (GridAR / best-of-N candidates count
each) never exceed `max_outstanding`; beyond it `submit` raises `Overloaded` at once. A request
with a timeout is refused at once (`DeadlineUnreachable`) when the measured throughput says the
work ahead of it plus its own cannot finish in time. A cancelled request (a client that went away)
has its rows dropped from their batch at the next step. Lanes (one batch per method, options and
sampling) are at most `max_lanes`; idle ones are evicted (least recently used first, and any idle
for `lane_idle_s`), and a request whose lane cannot be made yet waits for one.
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
import torch

from arexport.budget import budget_bytes, check as check_budget, kv_cache_bytes
from arexport.errors import ArexportError
from arexport.families import Conditions
from arexport.runtime.generator import Generator
from arexport.runtime.methods.base import Method, Row
from arexport.runtime.rng import image_seed
from arexport.runtime.sampling import SamplingParams
from arexport.runtime.scheduler import Scheduler
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
    method: Method
    sampling: SamplingParams
    seed: int = 0
    images: bool = True
    timeout: Optional[float] = None
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)
    results: dict = field(default_factory=dict)  # image index -> tokens
    latents: dict = field(default_factory=dict)  # image index -> VQVAE latents (VAR more_smooth makes images from them)

    @property
    def n(self) -> int:
        return len(self.conds)

    @property
    def cost(self) -> int:
        """Images this request generates (GridAR / best-of-N generate every candidate)."""
        return self.n * int(getattr(self.method.options, "candidates", 1) or 1)

    @property
    def key(self) -> tuple:
        """Requests with the same key share a batch: same method, options and sampling."""
        return (self.method.name, repr(self.method.options), self.sampling)

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now > self.submitted + self.timeout

    def rows(self) -> list[Row]:
        return [Row(self.conds.select(slice(i, i + 1)), image_seed(self.seed, i), (self, i)) for i in range(self.n)]


def _fairness(row: Row):
    """Scheduler group of a row: requests with a timeout run first come, first served among
    themselves (the order admission control's finish estimate assumes, so an admitted request is
    not pushed past its deadline by later ones); others round robin, so a large request cannot hold
    every slot while a small one waits."""
    r = row.tag[0]
    return "deadline" if r.timeout is not None else id(r)


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
        self._lane_used: dict[tuple, float] = {}  # lane key -> last time it stepped or took rows
        self.waiting_for_lane = 0
        self._turn_images = 0
        self._last_turn: Optional[float] = None
        self._queue: "queue.Queue[Request]" = queue.Queue(maxsize=max_queue)
        self._pending: list[Request] = []  # taken from the queue, not yet given to a scheduler
        self._lanes: dict[tuple, Scheduler] = {}
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
        m = self.gen.method(method, options)
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
    def load(self) -> dict:
        """Admission state for /healthz: outstanding images against the bound, lanes, memory."""
        try:
            free, _ = budget_bytes(getattr(self.engine, "device", None))
        except ArexportError:
            free = None
        return {"outstanding_images": self._outstanding, "max_outstanding_images": self.max_outstanding,
                "lanes": len(self._lanes), "max_lanes": self.max_lanes, "lane_bytes": self.lane_bytes(),
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
        total = 0
        for lane in list(self._lanes.values()):
            for cache, _ in list(getattr(lane.decoder.slots, "_caches", [])):
                total += sum(t.numel() * t.element_size() for t in list(cache.keys) + list(cache.values))
        return total

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
        return any(s.busy for s in self._lanes.values())

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
        for lane in list(self._lanes.values()):
            if lane.busy:
                self._step(lane)
                stepped, live = True, live + lane.decoder.live
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

    @staticmethod
    def _live(tag) -> bool:
        return not tag[0].future.done()

    def _expire(self) -> None:
        now = time.monotonic()
        self._pending = [r for r in self._pending if not r.future.done()]
        for r in self._pending + self._inflight():
            if r.expired(now):
                self._fail(r, RequestTimeout(f"request timed out after {r.timeout}s"), "timeout")
        self._pending = [r for r in self._pending if not r.future.done()]
        for lane in self._lanes.values():
            lane.drop(self._live)

    def _inflight(self) -> list[Request]:
        seen: dict[int, Request] = {}
        for lane in self._lanes.values():
            for row in list(lane.queue):
                seen[id(row.tag[0])] = row.tag[0]
            for tag in lane.decoder.slots.tags:
                seen[id(tag[0])] = tag[0]
        return list(seen.values())

    def _lane(self, r: Request) -> Optional[Scheduler]:
        """r's lane, made when missing; None when max_lanes lanes are all busy (r waits)."""
        key = r.key
        if key not in self._lanes:
            if len(self._lanes) >= self.max_lanes:
                idle = sorted((k for k, v in self._lanes.items() if not v.busy and not v.queue),
                              key=lambda k: self._lane_used.get(k, 0.0))
                if not idle:
                    return None
                self._drop_lane(idle[0])
            dec = self.gen.decoder(r.method, r.sampling, self.max_batch)
            self._lanes[key] = Scheduler(dec, fair_by=_fairness)
        self._lane_used[key] = time.monotonic()
        return self._lanes[key]

    def _drop_lane(self, key: tuple) -> None:
        self._lanes.pop(key, None)
        self._lane_used.pop(key, None)

    def _evict_idle_lanes(self) -> None:
        now = time.monotonic()
        for key in [k for k, v in self._lanes.items()
                    if not v.busy and not v.queue and now - self._lane_used.get(k, now) > self.lane_idle_s]:
            self._drop_lane(key)
        self.metrics.lanes.set(len(self._lanes))
        self.metrics.lane_bytes.set(self.lane_bytes())

    def _dispatch(self) -> None:
        if self.batching == "continuous":
            waiting = []
            for r in self._pending:
                if not self._admit(r):
                    waiting.append(r)
            self._pending = waiting
            self.waiting_for_lane = len(waiting)
            return
        if self._busy or not self._pending:  # request / none: one group at a time, run to its end
            return
        r = self._pending[0]
        group = [r]
        if self.batching == "request":
            n = r.n
            for other in self._pending[1:]:
                if other.key == r.key and n + other.n <= self.max_batch:
                    group.append(other)
                    n += other.n
        taken = {id(g) for g in group}  # requests stay in _pending until they are admitted: nothing is lost
        admitted = {id(g) for g in group if self._admit(g)}
        self._pending = [p for p in self._pending if id(p) not in taken or id(p) not in admitted]

    def _admit(self, r: Request) -> bool:
        """Give r's rows to its lane; False when r must wait for a lane (it stays pending)."""
        try:
            lane = self._lane(r)
            if lane is None:
                return False
            lane.submit(r.rows())
        except Exception as e:  # e.g. an engine that cannot hold this batch: fail this request alone
            self._fail(r, e if isinstance(e, ArexportError) else ArexportError(f"could not start the request: {e}"), "error")
        return True

    def _step(self, lane: Scheduler) -> None:
        t0 = time.perf_counter()
        before = self.engine.forward_count()
        for k, v in self._lanes.items():
            if v is lane:
                self._lane_used[k] = time.monotonic()
        try:
            done = lane.step()
        except (Exception, SystemExit) as e:  # a step failed (a hook raised, ...): only the requests in its batch fail
            err = e if isinstance(e, ArexportError) else ArexportError(f"generation failed: {type(e).__name__}: {e}")
            running = {id(t[0]): t[0] for t in lane.decoder.slots.tags}
            for r in running.values():
                self._fail(r, err, "error")
            waiting = {id(row.tag[0]): row.tag[0] for row in lane.queue if id(row.tag[0]) not in running}
            self._pending.extend(r for r in waiting.values() if not r.results)  # they start again in a fresh batch
            self._lanes = {k: v for k, v in self._lanes.items() if v is not lane}
            return
        dec = lane.decoder
        seconds = time.perf_counter() - t0
        self.metrics.record_step(seconds, self.engine.forward_count() - before, dec.live / dec.slots.capacity)
        self._turn_images += len(done)
        for f in done:
            r, i = f.tag
            if r.future.done():
                continue
            r.results[i] = f.tokens.cpu()
            if f.latents is not None:
                r.latents[i] = f.latents
            if len(r.results) == r.n:
                self._finish(r, torch.stack([r.results[j] for j in range(r.n)]))

    def _finish(self, r: Request, tokens: torch.Tensor) -> None:
        try:
            if not r.images:
                images = None
            elif r.latents:
                images = self.engine.decode_latents(torch.stack([r.latents[j] for j in range(r.n)])).cpu().numpy()
            else:
                images = self.engine.decode_images(tokens).cpu().numpy()
        except Exception as e:
            self._fail(r, e if isinstance(e, ArexportError) else ArexportError(f"image decoding failed: {e}"), "error")
            return
        seconds = time.monotonic() - r.submitted
        try:
            r.future.set_result(Response(tokens.numpy(), images, seconds))
        except InvalidStateError:  # cancelled meanwhile
            return
        self.metrics.latency.labels(r.method.name).observe(seconds)
        self.metrics.images.inc(r.n)
        self.metrics.requests.labels(r.method.name, "ok").inc()

    def _fail_outstanding(self, err: Exception, reason: str, queued: bool) -> None:
        """Fail every request the worker holds (pending or in a scheduler) and, with `queued`, those
        still in the queue. Schedulers are dropped (their state is unknown after an error); new ones
        are made on demand."""
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
        self._lane_used.clear()

    def _fail(self, r: Request, err: Exception, reason: str = "closed") -> None:
        if r.future.done():
            return
        try:
            r.future.set_exception(err)
        except InvalidStateError:
            return
        self.metrics.requests.labels(r.method.name, reason).inc()
