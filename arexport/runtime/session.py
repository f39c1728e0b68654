"""Step-wise generation: the public API under `Generator.generate`, for code that runs its own loop.

In the spirit of onnxruntime-genai's `Generator`: open a batch for one method and its options, add
requests (each with its own conditions, sampling and seed) at any time, `step()` to advance every
live image by one step of the method, collect `finished()` images, `cancel()` a request. A request
added while the batch is full waits and joins at a step boundary; what an image gets does not
depend on what it shares the batch with (its own seed stream, its own sampling).

    gen = Generator.load("demo")
    s = gen.session("ar", capacity=4)
    h = s.add(classes=[3, 7], seed=1)
    s.add(classes=[5], sampling=gen.sampling_params(temperature=0.5))
    while not s.is_done():
        s.step()
        for img in s.finished():
            ...  # img.request, img.index, img.tokens [n_tokens], img.image [H, W, 3] uint8

What one batch shares (and `add` checks): whether it is guided (cfg-scale > 1 doubles every image
into conditional and unconditional rows), and the options a method builds once per batch (LANTERN's
greedy variant; GridAR's 3-way weight when it follows the guidance scale). Everything else in
SamplingParams is per image.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Hashable, Optional, Sequence

import numpy as np
import torch

from arexport.errors import ArexportError
from arexport.runtime.methods.base import Context, Finished, Method, Row, RowStats
from arexport.runtime.rng import image_seed
from arexport.runtime.sampling import SamplingParams
from arexport.runtime.scheduler import Scheduler

MAX_SEED = 1 << 63


@dataclass
class Image:
    """One finished image of a request: its index among the request's images, raster tokens
    [n_tokens] int64, the uint8 image [H, W, 3] (None when the session was opened with images=False),
    what generating it cost (stats) and the method's extras (GridAR's candidates, ...)."""

    request: int
    index: int
    tokens: np.ndarray
    image: Optional[np.ndarray]
    stats: RowStats
    extras: dict[str, Any] = field(default_factory=dict)


def decode_finished(engine, finished: Sequence[Finished], batch_size: int = 8) -> np.ndarray:
    """uint8 images [N, H, W, 3] of finished results, `batch_size` per decoder call: from their latents
    where a method left them (VAR more_smooth), else decoded from their tokens. The one image decoder
    of the runtime (generate, sessions and the service use it)."""
    if not finished:
        raise ArexportError("no finished images to decode")
    if batch_size < 1:
        raise ArexportError(f"decode batch size must be >= 1, got {batch_size}")
    with_latents = [f.latents is not None for f in finished]
    if any(with_latents) and not all(with_latents):
        raise ArexportError("cannot decode images with and without latents in one call")
    if with_latents[0]:
        src, decode = torch.stack([f.latents for f in finished]), engine.decode_latents
    else:
        src, decode = torch.stack([f.tokens for f in finished]), engine.decode_images
    return torch.cat([decode(src[i:i + batch_size]).cpu() for i in range(0, len(src), batch_size)]).numpy()


class Session:
    """A batch of `capacity` image slots running one method (see module docstring). Not thread-safe:
    one caller drives it (Generator.generate holds the generator's lock around its own session)."""

    def __init__(self, engine, method: Method, sampling: SamplingParams, capacity: int, draft=None,
                 images: bool = True, decode_batch: int = 8):
        if capacity < 1:
            raise ArexportError(f"session capacity must be >= 1, got {capacity}")
        self.engine, self.method, self.sampling = engine, method, sampling.validate(engine.spec.vocab_size)
        self.decoder = method.decoder(Context(engine, sampling, method.options, draft), capacity)
        self.capacity = capacity
        self.scheduler = Scheduler(self.decoder, fair_by=lambda row: self._groups[row.tag[0]])
        self.images, self.decode_batch = images, decode_batch
        self._ids = itertools.count()
        self._sizes: dict[int, int] = {}  # live request -> images not yet finished
        self._groups: dict[int, Hashable] = {}  # live request -> its admission group
        self._done: list[Finished] = []

    @property
    def spec(self):
        return self.engine.spec

    def add(self, classes=None, captions=None, caption_mask=None, prompts=None, conditions=None,
            sampling: Optional[SamplingParams] = None, seed: int = 0, seeds: Optional[Sequence[int]] = None,
            group: Optional[Hashable] = None) -> int:
        """Queue a request: one image per condition (class ids, caption features, prompts, or a packed
        Conditions). Image i uses seed image_seed(seed, i), or seeds[i]; `sampling` None: the
        session's. Returns the request's handle. Every check runs before anything is queued.

        Waiting images are admitted round robin over groups (in order of arrival), first come first
        served within a group; a request is its own group unless `group` names a shared one (a
        service puts its deadline requests in one FIFO group). Admission order never changes an
        image's tokens, only when it finishes."""
        if conditions is None:
            if prompts is not None:
                if classes is not None or captions is not None:
                    raise ArexportError("give prompts, class ids or caption embeddings, not several")
                conditions = self.engine.family.prompt_conditions(self.engine, prompts)
            else:
                conditions = self.engine.family.conditions(self.spec, classes, captions, caption_mask)
        n = len(conditions)
        for s in [seed] + list(seeds or []):
            if not 0 <= int(s) < MAX_SEED:
                raise ArexportError(f"seed must be in [0, 2**63), got {s}")
        if seeds is None:
            seeds = [image_seed(seed, i) for i in range(n)]
        elif len(seeds) != n:
            raise ArexportError(f"got {len(seeds)} seeds for {n} images")
        p = sampling or self.sampling
        self.decoder.check_sampling(p)  # an image the batch cannot hold fails here, not at admission
        h = next(self._ids)
        self._groups[h] = h if group is None else group
        self.scheduler.submit(Row(conditions.select(slice(i, i + 1)), int(s) & ((1 << 62) - 1), (h, i), p)
                              for i, s in enumerate(seeds))  # row streams take 62-bit seeds
        self._sizes[h] = n
        return h

    def step(self) -> None:
        """Admit waiting images into free slots, then advance every live image by one method step."""
        self._done.extend(self._settle(self.scheduler.step()))

    def _settle(self, done: list[Finished]) -> list[Finished]:
        for f in done:
            h = f.tag[0]
            self._sizes[h] -= 1
            if not self._sizes[h]:
                del self._sizes[h], self._groups[h]
        return done

    def finished(self) -> list[Image]:
        """The images that finished since the last call, in completion order (decoded when the
        session makes images)."""
        done, self._done = self._done, []
        if not done:
            return []
        imgs = decode_finished(self.engine, done, self.decode_batch) if self.images else [None] * len(done)
        return [Image(f.tag[0], f.tag[1], f.tokens.cpu().numpy(), im, f.stats, f.extras) for f, im in zip(done, imgs)]

    def take(self) -> list[Finished]:
        """The raw decoder results finished since the last call (tokens on the engine's device, latents),
        for callers that decode themselves (Generator.generate decodes a whole run at once)."""
        done, self._done = self._done, []
        return done

    def cancel(self, handle: int) -> bool:
        """Drop a request's queued and running images (its slots are free at the next step); whether
        it was still live. Images of it that already finished stay in `finished()`."""
        if handle not in self._sizes:
            return False
        del self._sizes[handle], self._groups[handle]
        self.scheduler.drop(lambda tag: tag[0] != handle)
        return True

    def shares(self, sampling: SamplingParams) -> bool:
        """Whether an image with `sampling` can join this batch: the same guidance layout (guided or
        not) and the same value of every option the method builds once per batch (see `add`). A
        service keeps one session per method and options, and a second only where this is False."""
        try:
            self.decoder.check_sampling(sampling)
        except ArexportError:
            return False
        return True

    def requests(self) -> list[int]:
        """Handles of the requests with images queued or running, in the order they were added."""
        return list(self._sizes)

    def running(self) -> set[int]:
        """Handles of the requests with an image in a slot now (admitted, not finished)."""
        return {tag[0] for tag in self.decoder.slots.tags}

    @property
    def waiting(self) -> int:
        """Images queued for a free slot."""
        return len(self.scheduler.queue)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the KV caches this session holds (allocated once, for its whole capacity)."""
        return self.decoder.slots.cache_bytes()

    def is_done(self) -> bool:
        """Whether no image is queued or running."""
        return not self.scheduler.busy

    @property
    def live(self) -> int:
        """Images in the batch now (queued ones not counted)."""
        return self.decoder.live

    @property
    def admissions(self) -> int:
        return self.scheduler.admissions

    @property
    def events(self):
        return self.decoder.events
