"""What every decoding method shares: declared options, typed statistics, the row batch, the registry.

A method is a *decoder*: a state machine over a static batch of image slots. `admit(rows)` queues
new images, `step()` prefills the queued ones and advances every live image by one engine step
(one token for `ar`, one verify block for `sjd`, one draft-and-verify round for `sd`, ...), and
returns the images that finished. One scheduler (runtime/scheduler.py) drives every decoder:
`Generator.generate` runs it to completion, the serving worker admits new images at step
boundaries. Each image keeps its own lengths, windows and random stream, so what it generates
does not depend on what it was batched with.

Live images occupy the slots [0, n) (finished ones are compacted away), so every engine call
runs over a contiguous prefix of the static cache and newly admitted images prefill as one
contiguous view. With CFG an image owns two cache rows, [cond, uncond], next to each other.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, get_type_hints

import torch

from arexport.errors import ArexportError
from arexport.families import Conditions
from arexport.runtime.rng import DrawCache, draws
from arexport.runtime.sampling import SamplingParams, guided_logits, row_params


# -- options ---------------------------------------------------------------------------------------
def option(default, help: str, flag: Optional[str] = None, choices: Optional[tuple] = None):
    """A method option: its default, its help text, the CLI flag that sets it (default --NAME) and
    the allowed values. Declared once, read by the CLI, the HTTP schema and the Python API."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


@dataclass(frozen=True)
class Options:
    """Base of every method's options dataclass; `validate` raises ArexportError naming the option."""

    def validate(self) -> "Options":
        return self


def option_fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) of an options class."""
    hints = get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def build_options(method: str, cls, values: dict[str, Any]) -> Options:
    """Options of `method` from a dict (CLI, HTTP, Python): unknown names and wrong types are errors."""
    known = {f.name: t for f, t in option_fields(cls)}
    out = {}
    for k, v in values.items():
        if k not in known:
            have = ", ".join(known) or "none"
            raise ArexportError(f"method {method} has no option {k!r} (its options: {have})")
        out[k] = _coerce(method, k, v, known[k])
    try:
        opts = cls(**out)
    except TypeError as e:
        raise ArexportError(f"bad options for method {method}: {e}") from None
    for f, _ in option_fields(cls):
        choices = f.metadata.get("choices")
        if choices and getattr(opts, f.name) not in choices and not (f.default is None and getattr(opts, f.name) is None):
            raise ArexportError(f"{method} {f.name} must be one of {', '.join(map(str, choices))}, got {getattr(opts, f.name)!r}")
    return opts.validate()


def _coerce(method: str, name: str, v, typ):
    """v checked against the option's type (ints are accepted for floats; nothing else is converted)."""
    import math
    import typing

    args = typing.get_args(typ)
    base = [a for a in args if a is not type(None)] if args else [typ]
    if v is None and type(None) in args:
        return None
    for t in base:
        if t is bool and isinstance(v, bool):
            return v
        if t is int and isinstance(v, int) and not isinstance(v, bool):
            return v
        if t is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            if not math.isfinite(float(v)):
                raise ArexportError(f"{method} {name} must be a finite number, got {v!r}")
            return float(v)
        if t is str and isinstance(v, str):
            return v
        if t is Any or t is object:
            return v
    want = " or ".join(getattr(t, "__name__", str(t)) for t in base)
    raise ArexportError(f"{method} {name} must be {want}, got {v!r}")


# -- statistics ------------------------------------------------------------------------------------
@dataclass
class RowStats:
    """What generating one image cost and did (typed; aggregated by the Generator).

    The fields every method fills. A method with statistics of its own subclasses this (its
    decoder's `row_stats`) and contributes them to the run's statistics through the one hook
    `run_fields`, and to the CLI's summary line through `summary` (VVS, GridAR, CoDe do)."""

    forwards: int = 0  # target engine calls this image took part in (its prefill included)
    draft_forwards: int = 0  # draft engine calls it took part in (sd, lantern, vvs)
    accepted: list[int] = field(default_factory=list)  # tokens committed per step (speculative: per round)

    @classmethod
    def run_fields(cls, rows: list["RowStats"], events: dict[str, int], forwards_per_image: float) -> dict[str, Any]:
        """The method's own fields of a run's statistics (`--stats-json`), from its images' stats and
        the decoder's event counts; forwards_per_image is the run's mean target forwards per image."""
        return {}

    @classmethod
    def summary(cls, stats: dict[str, Any]) -> Optional[str]:
        """What an image cost, in the method's own terms, for the CLI's summary line (None: the
        generic target-forwards wording)."""
        return None


@dataclass
class Row:
    """One image to generate: its condition (a one-row Conditions), its seed, who asked for it, and
    its sampling (None: the batch's, `Context.params`)."""

    cond: Conditions
    seed: int
    tag: Any = None
    sampling: Optional[SamplingParams] = None


@dataclass
class Finished:
    """A generated image: raster tokens [n_tokens] (on the engine's device), its stats and tag."""

    tokens: torch.Tensor
    stats: RowStats
    tag: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    latents: Optional[torch.Tensor] = None  # the image's VQVAE latents when they, not the tokens, make the image (VAR more_smooth)


# -- classifier-free guidance rows ---------------------------------------------------------------
class CFGRows:
    """Classifier-free guidance doubles an image into rows [cond, uncond] fed the same tokens."""

    def __init__(self, params: SamplingParams, n_tokens: int):
        self.n_tokens = n_tokens
        self.per_image = 2 if params.uses_cfg else 1  # the batch's layout: every image guided, or none
        self._pairs: Optional[torch.Tensor] = None

    def conditions(self, engine, conds: Conditions) -> Conditions:
        """Conditions for all rows: each image's condition followed by its null condition (CFG)."""
        conds = conds.to(engine.device)
        if self.per_image == 1:
            return conds
        return conds.interleave(engine.family.null_conditions(engine, conds))

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image tensor [B, ...] -> per-row tensor [rows, ...]."""
        if self.per_image == 1:
            return x
        b = x.shape[0]
        if self._pairs is None or self._pairs.shape[0] < 2 * b or self._pairs.device != x.device:
            self._pairs = torch.arange(2 * b, device=x.device) // 2  # 0, 0, 1, 1, ...
        return x.index_select(0, self._pairs[: 2 * b])

    def add_per_image(self, rows: torch.Tensor, x: torch.Tensor) -> None:
        """Per-row tensor rows [rows] += per-image x [B] (in place)."""
        if self.per_image == 2:
            rows.view(-1, 2).add_(x[:, None])
        else:
            rows.add_(x)

    def guide(self, logits: torch.Tensor, token_index, params, extra: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-row logits -> per-image guided logits for the image tokens with these indices (an int,
        or an integer tensor [B, ...] over the leading dims): the schedule's scale at each index, with
        each image's guidance options (params: SamplingParams or RowParams over the B images) and an
        optional further guidance term `extra` [B, ..., V] (see sampling.guided_logits)."""
        if self.per_image == 1:
            return logits
        return guided_logits(logits[0::2], logits[1::2], params, token_index, self.n_tokens, extra)


# -- the row batch ---------------------------------------------------------------------------------
class Slots:
    """A static batch of `capacity` image slots; live images are the prefix [0, n).

    Per-image tensors ([capacity, ...]) and per-row tensors and caches ([capacity * rows_per_image, ...])
    are registered once and move together when a finished image's slot is filled by the last live
    one. Each image has its own counter-based random stream (seed, draws so far)."""

    def __init__(self, capacity: int, rows_per_image: int, device, streams: int = 1):
        self.capacity, self.rows_per_image, self.device = capacity, rows_per_image, torch.device(device)
        self.n = 0
        self.started = 0  # slots [0, started) are prefilled; [started, n) are admitted, not yet started
        self.tags: list[Any] = []
        self.stats: list[RowStats] = []  # each image's, made by the decoder (its method's RowStats class)
        self.lists: list[list] = [self.tags, self.stats]
        self._image: list[torch.Tensor] = []
        self._fill: list = []
        self._row: list[torch.Tensor] = []
        self._caches: list = []
        self.streams = streams  # random streams per image (one per GridAR candidate)
        self.seeds = self.image_tensor((streams,), torch.int64)
        self.counters = self.image_tensor((streams,), torch.int64)
        self._cache = DrawCache() if self.device.type == "cpu" else None  # on a device: hashed there, no host trip

    def image_tensor(self, shape: tuple, dtype=torch.int64, fill=0, device=None) -> torch.Tensor:
        """A per-image tensor [capacity, *shape] that moves with its image (on the slots' device unless
        `device` says otherwise: host-side state the decoder reads on the host anyway)."""
        t = torch.full((self.capacity, *shape), fill, dtype=dtype, device=self.device if device is None else device)
        self._image.append(t)
        self._fill.append(fill)
        return t

    def row_tensor(self, shape: tuple, dtype=torch.float32, fill=0) -> torch.Tensor:
        t = torch.full((self.capacity * self.rows_per_image, *shape), fill, dtype=dtype, device=self.device)
        self._row.append(t)
        return t

    def cache(self, cache, rows_per_image: Optional[int] = None):
        """Register a KV cache whose rows move with their image (default rows_per_image: the batch's)."""
        self._caches.append((cache, rows_per_image or self.rows_per_image))
        return cache

    def cache_bytes(self) -> int:
        """Bytes of the registered KV caches (their static buffers, whatever is live)."""
        return sum(t.numel() * t.element_size() for c, _ in self._caches for t in (*c.keys, *c.values))

    def image_list(self) -> list:
        """A per-image Python list kept in slot order (compacted with the tensors)."""
        lst: list = []
        self.lists.append(lst)
        return lst

    @property
    def free(self) -> int:
        return self.capacity - self.n

    @property
    def rows(self) -> int:
        return self.n * self.rows_per_image

    def rows_of(self, start: int, stop: int) -> tuple[int, int]:
        return start * self.rows_per_image, stop * self.rows_per_image

    def admit(self, seeds: list[int], tags: list[Any], stats: list[RowStats]) -> None:
        k = len(seeds)
        if k > self.free:
            raise ArexportError(f"{k} images do not fit in {self.free} free slots")
        s = slice(self.n, self.n + k)
        for t, fill in zip(self._image, self._fill):  # a reused slot starts clean
            t[s] = fill
        self.seeds[s] = torch.as_tensor(seeds, dtype=torch.int64, device=self.device)[:, None]
        self.counters[s] = 0
        self.tags.extend(tags)
        self.stats.extend(stats)
        for lst in self.lists[2:]:
            lst.extend(None for _ in range(k))
        self.n += k

    def uniform(self, lanes: int, active: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Uniforms [n * streams, lanes] from each live stream; only `active` ([n]) images advance theirs."""
        u = self._draws((lanes,))[0]
        self.counters[: self.n] += 1 if active is None else active.long()[:, None]
        return u

    def uniforms(self, *lanes: int) -> list[torch.Tensor]:
        """Consecutive draws of every live stream, hashed in one call: the same numbers as
        `uniform(lanes[0])`, `uniform(lanes[1])`, ... one after the other ([n * streams, lanes[i]] each)."""
        out = self._draws(lanes)
        self.counters[: self.n] += len(lanes)
        return out

    def _draws(self, lanes) -> list[torch.Tensor]:
        n = self.n
        seeds, counters = self.seeds[:n].reshape(-1), self.counters[:n].reshape(-1)
        if self._cache is not None and max(lanes) <= DrawCache.WIDTH:
            return self._cache.draws(seeds.tolist(), counters.tolist(), lanes)
        return draws(seeds, counters, lanes)

    def _rows(self, i: int, per: Optional[int] = None) -> torch.Tensor:
        per = per or self.rows_per_image
        return torch.arange(i * per, (i + 1) * per, device=self.device)

    @staticmethod
    def where(done: torch.Tensor) -> list[int]:
        """Slot indices where the bool tensor [n] is True (one host sync)."""
        return torch.nonzero(done).flatten().tolist()

    def span(self, a: int, b: int) -> torch.Tensor:
        """[n] bool: True for the live images in [a, b)."""
        m = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        m[a:b] = True
        return m

    def remove(self, done: list[int]) -> None:
        """Drop finished images: each slot is filled by the last live image (all registered state moves)."""
        for i in sorted(done, reverse=True):
            last = self.n - 1
            if i != last:
                for t in self._image:
                    t[i] = t[last]
                for t in self._row:
                    t[self._rows(i)] = t[self._rows(last)]
                for c, k in self._caches:
                    c.copy_rows(self._rows(i, k).to(c.device), self._rows(last, k).to(c.device))
            for lst in self.lists:
                lst[i] = lst[last]
                lst.pop()
            self.n -= 1
        self.started = min(self.started, self.n)


# -- methods and decoders ----------------------------------------------------------------------------
@dataclass
class Context:
    """What a decoder runs on: engines, the batch's sampling (what rows without their own use; it
    also fixes whether the batch is guided) and the method's options."""

    engine: Any  # StepEngine
    params: SamplingParams
    options: Options
    draft: Any = None  # StepEngine of the draft model (sd, lantern, vvs)


class Decoder:
    """A method's state machine over a static batch (see module docstring).

    Sampling is per image: each admitted Row may bring its own SamplingParams. What must be shared
    by a batch is checked at admission (`check_sampling`): whether it is guided (the row layout),
    plus whatever a method builds once per batch (`batch_sampling_keys`)."""

    batch_sampling_keys: tuple = ()  # SamplingParams attributes a method needs equal across its batch
    row_stats: type = RowStats  # each image's statistics (a method's own fields: a subclass, see RowStats)

    def __init__(self, ctx: Context, capacity: int, rows_per_image: int, streams: int = 1):
        self.ctx, self.engine, self.opts = ctx, ctx.engine, ctx.options
        self.cfg = CFGRows(ctx.params, ctx.engine.spec.n_tokens)
        self.spec = ctx.engine.spec
        self.slots = Slots(capacity, rows_per_image, ctx.engine.device, streams)
        self.row_sampling = self.slots.image_list()  # each image's SamplingParams (after `sampling_of`)
        self.pending_conds: list[Conditions] = []
        self.events: Counter = Counter()  # method-level event counts (gridar verifier invocations)

    @property
    def params(self):
        """Sampling of the live images [0, n): SamplingParams when they share it, else RowParams."""
        return self.sampling(0, self.slots.n)

    def sampling(self, a: int, b: int):
        """Sampling of images [a, b): SamplingParams when they share it, else RowParams."""
        return row_params(self.row_sampling[a:b], self.slots.device)

    def sampling_of(self, p: SamplingParams) -> SamplingParams:
        """The params an image samples with, from those it was admitted with (CoDe's official sampler
        replaces some); raises ArexportError when the image cannot join this batch."""
        return p

    def check_sampling(self, p: SamplingParams) -> SamplingParams:
        """p validated for this batch (see class docstring); the params the image samples with."""
        p.validate(self.spec.vocab_size)
        base = self.ctx.params
        if p.uses_cfg != base.uses_cfg:
            raise ArexportError(f"this batch is {'' if base.uses_cfg else 'un'}guided (opened with cfg-scale "
                                f"{base.cfg_scale:g}); an image with cfg-scale {p.cfg_scale:g} needs a batch that is "
                                f"{'' if p.uses_cfg else 'un'}guided")
        for k in self.batch_sampling_keys:
            if getattr(p, k) != getattr(base, k):
                raise ArexportError(f"{type(self).__name__.removesuffix('Decoder')} needs one {k.replace('_', '-')} per batch: this one has {getattr(base, k)!r}, "
                                    f"the image asks for {getattr(p, k)!r}")
        return self.sampling_of(p)

    @property
    def live(self) -> int:
        return self.slots.n

    @property
    def free(self) -> int:
        return self.slots.free

    def admit(self, rows: list[Row]) -> None:
        """Queue images; they prefill at the start of the next step."""
        params = [self.check_sampling(r.sampling or self.ctx.params) for r in rows]  # all checked before any is admitted
        n = self.slots.n
        self.slots.admit([r.seed for r in rows], [r.tag for r in rows], [self.new_stats() for _ in rows])
        self.row_sampling[n:] = params
        self.pending_conds.append(Conditions.cat([r.cond for r in rows]))

    @torch.inference_mode()
    def step(self) -> list[Finished]:
        """Start admitted images, advance every live image by one engine step; the finished images.

        Runs in inference mode: the runtime's many small tensor ops skip autograd's bookkeeping
        (about 15% of each op's cost on a CPU). The decoder's buffers are made outside it, so they
        stay ordinary tensors that admission and eviction can write between steps."""
        s = self.slots
        if s.started < s.n:
            conds = Conditions.cat(self.pending_conds)
            self.pending_conds.clear()
            self.start(s.started, s.n, conds)
            s.started = s.n
        if s.n == 0:
            return []
        done = self.advance()
        out = [self.finish(i) for i in done]
        s.remove(done)
        if s.n:
            self.after()
        return out

    def evict(self, keep: Callable[[Any], bool]) -> int:
        """Drop started images whose tag fails keep(tag) (a cancelled or expired request); how many."""
        s = self.slots
        gone = [i for i in range(s.started) if not keep(s.tags[i])]
        s.remove(gone)
        return len(gone)

    def start(self, a: int, b: int, conds: Conditions) -> None:
        """Prefill images [a, b) (conditions of those images, in order)."""
        raise NotImplementedError

    def fresh_class_rows(self, a: int, b: int, conds: Conditions) -> tuple[int, int, torch.Tensor]:
        """For decoders that feed the class token themselves (ARPG, PAR, RandAR, LPD): clear the cache rows of
        images [a, b) (length 0, every key valid) and return their rows [r0, r1) with each row's class token
        (the null class on guidance rows) [r1 - r0]."""
        r0, r1 = self.slots.rows_of(a, b)
        view = self.cache.view(r0, r1)
        view.length.zero_()
        view.key_valid.fill_(True)
        rows = self.cfg.conditions(self.engine, conds)
        return r0, r1, self.engine.family.condition_tokens(self.spec, rows.classes)

    def prefill(self, engine, cache, a: int, b: int, rows: Conditions) -> torch.Tensor:
        """Prefill the rows of images [a, b) of `cache` (a contiguous view, stale key masks cleared)
        with the condition `rows` through `engine`'s family; logits [rows, V]."""
        view = cache.view(*self.slots.rows_of(a, b))
        view.key_valid.fill_(True)
        return engine.family.prefill(engine, view, rows.to(engine.device))

    def first_token(self, logits: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Token 0 of images [a, b) sampled from their prefill logits, each from its own stream."""
        from arexport.runtime.sampling import probs_from_logits, sample_from_probs

        params = self.sampling(a, b)
        p0 = probs_from_logits(self.cfg.guide(logits, 0, params), params)
        return sample_from_probs(p0, self.slots.uniform(1, self.slots.span(a, b))[a:b, 0])

    def advance(self) -> list[int]:
        """One step for images [0, n); the slots that finished."""
        raise NotImplementedError

    def after(self) -> None:
        """Work for the images still live once the finished ones left (AR feeds its sampled tokens here)."""

    def finish(self, i: int) -> Finished:
        raise NotImplementedError

    def new_stats(self) -> RowStats:
        """Fresh statistics of an admitted image."""
        return self.row_stats()

    def finished(self, i: int, tokens: torch.Tensor, extras: Optional[dict] = None) -> Finished:
        """The result of slot i: its raster tokens [n_tokens] with its stats and tag."""
        return Finished(tokens, self.slots.stats[i], self.slots.tags[i], extras or {})


class Method:
    """A registered decoding method: its Options dataclass and how it builds a decoder."""

    name: str = "?"
    Options: type = Options
    decoder_class: type = Decoder  # built by decoder(); methods that need more override decoder()
    needs_draft: bool = False
    second_engine: str = "--draft"  # the flag that names the second engine (sd: --draft, code: --refiner)
    help: str = ""

    def __init__(self, options: Options):
        self.options = options

    def requires_draft(self) -> bool:
        return self.needs_draft

    def decoder(self, ctx: Context, capacity: int) -> Decoder:
        return self.decoder_class(ctx, capacity)


METHODS: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator adding a method to the registry under `name`."""
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def make_method(name: str, **options) -> Method:
    """A registered method with validated options; unknown names, options or types are errors."""
    from arexport.runtime import methods  # noqa: F401  (registers the built-in methods)

    if name not in METHODS:
        raise ArexportError(f"unknown decoding method {name!r}; available: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    return cls(build_options(name, cls.Options, options))


def method_stats(name: str) -> type[RowStats]:
    """The statistics class of a registered method (its summary hook: RowStats.summary)."""
    from arexport.runtime import methods  # noqa: F401  (registers the built-in methods)

    if name not in METHODS:
        raise ArexportError(f"unknown decoding method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name].decoder_class.row_stats


def method_names() -> list[str]:
    """The registered decoding methods, sorted."""
    from arexport.runtime import methods  # noqa: F401  (registers the built-in methods)

    return sorted(METHODS)


def parse_method_options(items, what: str = "--option") -> dict[str, Any]:
    """['window=16', 'init=random', ...] -> {'window': 16, 'init': 'random'}: ints, floats and
    true/false are typed, dashes in keys become underscores. `what` names the source in errors."""
    opts: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise ArexportError(f"bad {what} {it!r}: expected K=V")
        k, v = it.split("=", 1)
        opts[k.strip().replace("-", "_")] = _typed(v.strip())
    return opts


def _typed(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v

