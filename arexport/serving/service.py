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
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from arexport.errors import ArexportError
from arexport.families import Conditions
from arexport.runtime.generator import Generator
from arexport.runtime.methods.base import Method, Row
from arexport.runtime.rng import image_seed
from arexport.runtime.sampling import SamplingParams
from arexport.runtime.scheduler import Scheduler
from arexport.serving.metrics import Metrics

MODES = ("continuous", "request", "none")


class ServiceClosed(ArexportError):
    """The service is shutting down and takes no (more) work."""


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
    def key(self) -> tuple:
        """Requests with the same key share a batch: same method, options and sampling."""
        return (self.method.name, repr(self.method.options), self.sampling)

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now > self.submitted + self.timeout

    def rows(self) -> list[Row]:
        return [Row(self.conds.select(slice(i, i + 1)), image_seed(self.seed, i), (self, i)) for i in range(self.n)]


@dataclass
class Response:
    tokens: np.ndarray  # [N, n_tokens]
    images: Optional[np.ndarray]  # uint8 [N, H, W, 3]
    seconds: float


class GenerationService:
    """See module docstring."""

    def __init__(self, generator: Generator, batching: str = "continuous", max_batch: int = 8, metrics: Optional[Metrics] = None,
                 max_queue: int = 1024):
        if batching not in MODES:
            raise ArexportError(f"batching must be one of {', '.join(MODES)}, got {batching!r}")
        self.gen = generator
        self.engine = generator.engine
        self.batching = batching
        self.max_batch = max(1, max_batch)
        self.metrics = metrics or Metrics()
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
        req = Request(conds, m, sampling, int(seed), images, timeout)
        with self._lock:
            if self._closing:
                self.metrics.rejected.labels("closed").inc()
                raise ServiceClosed("the service is shutting down")
            try:
                self._queue.put_nowait(req)
            except queue.Full:
                self.metrics.rejected.labels("queue_full").inc()
                raise ServiceClosed("the request queue is full; retry later") from None
        self.metrics.queue_depth.set(self._queue.qsize() + len(self._pending))
        return req.future

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
        if self._closing and not self._drain:
            self._fail_outstanding(ServiceClosed("the service shut down before this request ran"), "closed", queued=True)
        if self._closing and not self._pending and not self._busy and self._queue.empty():
            return True
        self._expire()
        self._dispatch()
        for lane in list(self._lanes.values()):
            if lane.busy:
                self._step(lane)
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
        for r in self._pending:
            if r.future.cancelled():
                self.metrics.rejected.labels("cancelled").inc()
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

    def _lane(self, r: Request) -> Scheduler:
        key = r.key
        if key not in self._lanes:
            dec = self.gen.decoder(r.method, r.sampling, self.max_batch)
            self._lanes[key] = Scheduler(dec, fair_by=lambda row: id(row.tag[0]))  # round robin over requests
        return self._lanes[key]

    def _dispatch(self) -> None:
        if self.batching == "continuous":
            for r in self._pending:
                self._admit(r)
            self._pending = []
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
        self._pending = [p for p in self._pending if id(p) not in taken]
        for g in group:
            self._admit(g)

    def _admit(self, r: Request) -> None:
        try:
            self._lane(r).submit(r.rows())
        except Exception as e:  # e.g. an engine that cannot hold this batch: fail this request alone
            self._fail(r, e if isinstance(e, ArexportError) else ArexportError(f"could not start the request: {e}"), "error")

    def _step(self, lane: Scheduler) -> None:
        t0 = time.perf_counter()
        before = self.engine.forward_count()
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
        self.metrics.record_step(time.perf_counter() - t0, self.engine.forward_count() - before,
                                 dec.live / dec.slots.capacity)
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

    def _fail(self, r: Request, err: Exception, reason: str = "closed") -> None:
        if r.future.done():
            return
        try:
            r.future.set_exception(err)
        except InvalidStateError:
            return
        self.metrics.requests.labels(r.method.name, reason).inc()
