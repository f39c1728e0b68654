"""GenerationService: the embeddable, thread- and asyncio-safe front end of a serving process.

Callers `submit()` requests from any thread (or `await agenerate()` from asyncio); one worker thread
owns the engine. Requests are batched:
* `continuous` (default) — `ar` on class-conditional LlamaGen and `arpg` on ARPG run in
  step-level batchers (serving/continuous.py): a request's images join the running batch at the
  next step;
* `request` — compatible queued requests (same method, options and sampling) are merged into one
  generation of up to `max_batch` images;
* `none` — one request at a time.
Every image keeps its own seed, so a request's output does not depend on what it was batched with.
Speculative methods (sjd, sd, lantern, vvs) are never merged with other requests: their step
sizes depend on the whole batch, which would make results batch-dependent.
Requests carry an optional timeout and can be cancelled; `close(drain=True)` finishes queued work,
`close(drain=False)` rejects it with `ServiceClosed` — nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from arexport.errors import ArexportError
from arexport.runtime.generator import Generator
from arexport.runtime.rng import image_seed
from arexport.runtime.sampling import SamplingParams, default_sampling
from arexport.serving.continuous import ContinuousAR, ContinuousARPG, Job
from arexport.serving.metrics import Metrics

BATCH_INVARIANT = {"ar", "arpg", "gridar", "best-of-n"}
MODES = ("continuous", "request", "none")


class ServiceClosed(ArexportError):
    """The service is shutting down and takes no (more) work."""


class RequestTimeout(ArexportError):
    """A request did not finish within its timeout."""


@dataclass
class Request:
    classes: list  # class ids, or one placeholder per caption for text-conditional requests
    method: str = "ar"
    options: dict = field(default_factory=dict)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    images: bool = True
    timeout: Optional[float] = None
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)
    results: dict = field(default_factory=dict)  # image index -> tokens
    captions: Optional[np.ndarray] = None  # t2i: [N, T, C] caption features
    caption_mask: Optional[np.ndarray] = None

    @property
    def key(self) -> tuple:
        return (self.method, tuple(sorted(self.options.items())), self.sampling, self.images)

    @property
    def deadline(self) -> Optional[float]:
        return None if self.timeout is None else self.submitted + self.timeout

    def expired(self, now: float) -> bool:
        d = self.deadline
        return d is not None and now > d


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
        self._pending: list[Request] = []  # taken from the queue, not started
        self._batchers: dict[tuple, Any] = {}
        self._waiting: dict[tuple, list[Job]] = {}
        self._closing = False
        self._drain = True
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="arexport-worker", daemon=True)
        self._worker.start()

    # -- public API ---------------------------------------------------------------------------------
    def submit(self, classes=None, method: str = "ar", options: Optional[dict] = None, sampling: Optional[SamplingParams] = None,
               seed: int = 0, images: bool = True, timeout: Optional[float] = None, captions=None,
               caption_mask=None) -> Future:
        """Queue a request (class ids, or caption features for t2i); the Future resolves to a Response."""
        spec = self.engine.spec
        if captions is not None:
            conds = self.gen.conditions(None, captions, caption_mask)  # validates shapes now, in the caller's thread
            req = Request(list(range(len(conds))), method, dict(options or {}), sampling or self.default_sampling(),
                          int(seed), images, timeout, captions=np.asarray(captions, np.float32),
                          caption_mask=None if caption_mask is None else np.asarray(caption_mask, bool))
        else:
            req = Request(list(map(int, classes if classes is not None else [])), method, dict(options or {}),
                          sampling or self.default_sampling(), int(seed), images, timeout)
            self.gen.conditions(req.classes)  # validates class ids now, in the caller's thread
        req.sampling.validate(spec.vocab_size)
        if method == "arpg" and spec.family != "arpg" or spec.family == "arpg" and method != "arpg":
            raise ArexportError(f"method {method} does not fit model family {spec.family}")
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
        return default_sampling(self.engine.spec)

    def close(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop taking requests; finish (drain) or reject queued ones; wait for the worker."""
        with self._lock:
            self._closing, self._drain = True, drain
        self._queue.put(None)  # wake the worker
        self._worker.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closing

    # -- worker ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if self._iteration():
                    return
            except Exception as e:  # never let the worker die with requests outstanding
                self._fail_everything(ArexportError(f"internal error in the serving worker: {type(e).__name__}: {e}"))

    def _fail_everything(self, err: Exception) -> None:
        """After an internal error: fail all work the worker holds and drop the batchers (their cache
        state is unknown now; new ones are made on demand). Requests still queued run later."""
        self._fail_outstanding(err, "error", queued=False, drop_batchers=True)

    def _fail_outstanding(self, err: Exception, reason: str, queued: bool, drop_batchers: bool) -> None:
        """Fail every request the worker holds (pending, waiting for a slot, in a batcher slot) and,
        with `queued`, those still in the queue."""
        for r in self._pending:
            self._fail(r, err, reason)
        self._pending.clear()
        while queued:
            try:
                r = self._queue.get_nowait()
            except queue.Empty:
                break
            if r is not None:
                self._fail(r, err, reason)
        for jobs in self._waiting.values():
            for j in jobs:
                self._fail(j.owner, err, reason)
            jobs.clear()
        for key, b in list(self._batchers.items()):
            for i, j in enumerate(b.jobs):
                if j is not None:
                    self._fail(j.owner, err, reason)
                    b.evict(i)
            if drop_batchers:
                del self._batchers[key]

    def _iteration(self) -> bool:
        """One turn of the worker; True when it should exit."""
        busy = any(b.active for b in self._batchers.values()) or any(self._waiting.values())
        self._take(block=not busy and not self._pending)
        if self._closing and not self._drain:
            self._reject_all()
        if self._closing and not self._pending and not busy and self._queue.empty() and not any(self._waiting.values()):
            return True
        self._expire()
        self._dispatch()
        for key, b in list(self._batchers.items()):
            self._step_batcher(key, b)
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

    def _reject_all(self) -> None:
        """close(drain=False): reject everything queued or started; batchers stay for nothing else."""
        self._fail_outstanding(ServiceClosed("the service shut down before this request ran"), "closed",
                               queued=True, drop_batchers=False)

    def _expire(self) -> None:
        now = time.monotonic()
        keep = []
        for r in self._pending:
            if r.future.cancelled():
                self.metrics.rejected.labels("cancelled").inc()
            elif r.expired(now):
                self._fail(r, RequestTimeout(f"request timed out after {r.timeout}s in the queue"), "timeout")
            else:
                keep.append(r)
        self._pending = keep
        for key, b in self._batchers.items():
            for i, j in enumerate(b.jobs):
                if j is not None and (j.owner.future.done() or j.owner.expired(now)):
                    if not j.owner.future.done():
                        self._fail(j.owner, RequestTimeout(f"request timed out after {j.owner.timeout}s"), "timeout")
                    b.evict(i)
        for jobs in self._waiting.values():
            jobs[:] = [j for j in jobs if not j.owner.future.done() and not j.owner.expired(now)]

    def _continuous_ok(self, r: Request) -> bool:
        spec = self.engine.spec
        if self.batching != "continuous" or r.captions is not None:
            return False
        if r.method == "ar" and spec.family == "llamagen" and spec.model_type == "c2i" and not r.options:
            return True
        return r.method == "arpg" and spec.family == "arpg" and set(r.options) <= {"steps", "schedule", "cfg_schedule", "order"} \
            and r.options.get("order", "row") == "row"

    def _dispatch(self) -> None:
        rest = []
        for r in self._pending:
            if self._continuous_ok(r):
                key = r.key
                if key not in self._batchers:
                    try:
                        self._batchers[key] = self._make_batcher(r)
                    except Exception as e:  # a bad request must not take the worker down
                        self._fail(r, e if isinstance(e, ArexportError) else ArexportError(str(e)), "error")
                        continue
                    self._waiting[key] = []
                self._waiting[key] += [Job(c, image_seed(r.seed, i), r, i) for i, c in enumerate(r.classes)]
            else:
                rest.append(r)
        self._pending = []
        while rest:
            r = rest.pop(0)
            group = [r]
            if self.batching == "request" and r.method in BATCH_INVARIANT and r.captions is None:
                n = len(r.classes)
                for other in list(rest):
                    if other.key == r.key and n + len(other.classes) <= self.max_batch:
                        group.append(other)
                        rest.remove(other)
                        n += len(other.classes)
            self._run_group(group)

    def _make_batcher(self, r: Request):
        rows_per = 2 if r.sampling.uses_cfg else 1
        slots = self.max_batch
        sizes = self.engine.batch_sizes
        if sizes is not None:
            fitting = [s // rows_per for s in sizes if s % rows_per == 0 and s // rows_per <= self.max_batch]
            if not fitting:
                raise ArexportError(f"no engine batch size fits {rows_per}-row images")
            slots = max(fitting)
        if r.method == "ar":
            return ContinuousAR(self.engine, slots, r.sampling)
        return ContinuousARPG(self.engine, slots, r.sampling, **r.options)

    def _step_batcher(self, key, b) -> None:
        waiting = self._waiting.get(key, [])
        for slot in b.free_slots():
            if not waiting:
                break
            b.admit(slot, waiting.pop(0))
        if not b.active:
            return
        t0 = time.perf_counter()
        before = self.engine.forward_count()
        done = b.step()
        self.metrics.record_step(time.perf_counter() - t0, self.engine.forward_count() - before, b.active / b.n_slots)
        for job in done:
            r = job.owner
            if r.future.done():
                continue
            r.results[job.index] = job.tokens.cpu()
            if len(r.results) == len(r.classes):
                tokens = torch.stack([r.results[i] for i in range(len(r.classes))])
                self._finish(r, tokens)

    def _run_group(self, group: list[Request]) -> None:
        now = time.monotonic()
        for r in group:
            if r.expired(now) and not r.future.done():
                self._fail(r, RequestTimeout(f"request timed out after {r.timeout}s in the queue"), "timeout")
        live = [r for r in group if not r.future.done()]
        if not live:
            return
        classes = [c for r in live for c in r.classes]
        seeds = [image_seed(r.seed, i) for r in live for i in range(len(r.classes))]
        r0 = live[0]
        t0 = time.perf_counter()
        cond = {"captions": r0.captions, "caption_mask": r0.caption_mask} if r0.captions is not None else {"classes": classes}
        try:
            res = self.gen.generate(seeds=seeds, method=r0.method, method_options=r0.options, sampling=r0.sampling,
                                    batch_size=self.max_batch, images=False, timings=False, **cond)
        except Exception as e:  # a bad request must not take the worker down
            for r in live:
                self._fail(r, e if isinstance(e, ArexportError) else ArexportError(f"generation failed: {e}"), "error")
            return
        self.metrics.record_step(time.perf_counter() - t0, res.stats["target_forwards"] + res.stats["draft_forwards"],
                                 min(1.0, len(classes) / self.max_batch))
        start = 0
        for r in live:
            n = len(r.classes)
            self._finish(r, torch.from_numpy(res.tokens[start:start + n]))
            start += n

    def _finish(self, r: Request, tokens: torch.Tensor) -> None:
        try:
            images = self.engine.decode_images(tokens).cpu().numpy() if r.images else None
        except Exception as e:
            self._fail(r, e if isinstance(e, ArexportError) else ArexportError(f"image decoding failed: {e}"), "error")
            return
        seconds = time.monotonic() - r.submitted
        try:
            r.future.set_result(Response(tokens.numpy(), images, seconds))
        except InvalidStateError:  # cancelled meanwhile
            return
        self.metrics.latency.labels(r.method).observe(seconds)
        self.metrics.images.inc(len(r.classes))
        self.metrics.requests.labels(r.method, "ok").inc()

    def _fail(self, r: Request, err: Exception, reason: str = "closed") -> None:
        if r.future.done():
            return
        try:
            r.future.set_exception(err)
        except InvalidStateError:
            return
        self.metrics.requests.labels(r.method, reason).inc()
