"""Step-level (continuous) batching: a static batch of slots, refilled by new images while others decode.

`ContinuousAR` (class-conditional LlamaGen, raster AR): every iteration is one step of the step
graph over all slots — a newly admitted image feeds its class token at cache slot 0 with the
condition position (its prefill), a running image feeds its last token at its own write index —
then every active slot samples its next token. Per-row write indices, positions and masks are
what the step graph takes anyway, so a new request never waits for the batch to drain.

`ContinuousARPG`: the same for ARPG's multi-query step. Slots sit at different schedule steps,
so the new tokens and the queries are padded to the largest counts; pads are masked out of
attention and written past each row's length (never read). The schedule's last step is
its largest, so every live slot keeps room for the largest feed and pads never overflow.

Rows are laid out slot-major ([cond, uncond] per slot with CFG) and a step runs only the rows up
to the highest occupied slot (cache views are contiguous prefixes), so a lightly loaded batch
does not pay for empty slots.

Each image samples from its own counter-based stream (seed, tokens drawn so far), exactly as the
`ar` / `arpg` methods do, so an image is the same whether it ran alone or next to others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from arexport.errors import ArexportError
from arexport.runtime.kv_cache import KVCache
from arexport.runtime.decoding.arpg import guidance, tokens_per_step
from arexport.runtime.rng import uniforms
from arexport.runtime.sampling import SamplingParams, cfg_combine, guided_logits, probs_from_logits, sample_from_probs, sample_logits


@dataclass
class Job:
    """One image of a request."""

    cls: int
    seed: int
    owner: Any = None  # the request it belongs to
    index: int = 0  # position in the request
    tokens: Optional[torch.Tensor] = None
    state: dict = field(default_factory=dict)


class _Slots:
    """Bookkeeping shared by the continuous batchers."""

    def __init__(self, engine, slots: int, params: SamplingParams):
        self.engine, self.spec, self.params = engine, engine.spec, params
        self.n_slots = slots
        self.cfg = params.uses_cfg
        self.rows = slots * (2 if self.cfg else 1)
        engine.check_batch(self.rows)
        dev = engine.device
        self.cache = engine.allocate(self.rows)
        self.jobs: list[Optional[Job]] = [None] * slots
        self.seeds = torch.zeros(slots, dtype=torch.int64, device=dev)
        self.counters = torch.zeros(slots, dtype=torch.int64, device=dev)
        self.fresh = torch.zeros(slots, dtype=torch.bool, device=dev)

    def free_slots(self) -> list[int]:
        return [i for i, j in enumerate(self.jobs) if j is None]

    @property
    def active(self) -> int:
        return sum(j is not None for j in self.jobs)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Per-slot tensor -> per-row tensor (slot-major: cond row, then uncond row, per slot)."""
        return x.repeat_interleave(2, dim=0) if self.cfg else x

    def rows_in_use(self) -> tuple[int, int]:
        """(slots, rows) covering every occupied slot, rounded up to a batch size the engine has."""
        hi = max((i for i, j in enumerate(self.jobs) if j is not None), default=-1) + 1
        per = 2 if self.cfg else 1
        sizes = self.engine.batch_sizes
        rows = hi * per
        if sizes is not None:
            rows = min((b for b in sizes if b >= rows and b % per == 0 and b <= self.rows), default=self.rows)
        return rows // per, rows

    def cache_view(self, rows: int) -> KVCache:
        """The first `rows` rows of the cache as views (writes go to the shared buffers)."""
        c = self.cache
        return KVCache([k[:rows] for k in c.keys], [v[:rows] for v in c.values], c.length[:rows], c.key_valid[:rows])

    @staticmethod
    def cond_first(logits: torch.Tensor) -> torch.Tensor:
        """Slot-major CFG rows [c0, u0, c1, u1, ...] -> the [cond; uncond] layout the CFG helpers take."""
        pair = logits.view(logits.shape[0] // 2, 2, *logits.shape[1:])
        return torch.cat([pair[:, 0], pair[:, 1]])

    def guide(self, logits: torch.Tensor, active) -> torch.Tensor:
        """Slot-major row logits [rows, ...] -> per-slot guided logits (CFG where active)."""
        if not self.cfg:
            return logits
        return guided_logits(self.cond_first(logits), self.params, active)

    def evict(self, slot: int) -> Optional[Job]:
        job, self.jobs[slot] = self.jobs[slot], None
        return job

    def draw(self, active: torch.Tensor, lanes: int) -> torch.Tensor:
        """Uniforms [n, lanes] for the first n = len(active) slots from their own streams; only
        active slots advance."""
        n = active.shape[0]
        u = uniforms(self.seeds[:n], self.counters[:n], lanes)
        self.counters[:n] += active.long()
        return u


class ContinuousAR(_Slots):
    """Continuous batching of raster AR (class-conditional LlamaGen)."""

    def __init__(self, engine, slots: int, params: SamplingParams):
        if engine.spec.family != "llamagen" or engine.spec.model_type != "c2i":
            raise ArexportError("continuous AR batching supports class-conditional LlamaGen models")
        super().__init__(engine, slots, params)
        n = self.spec.n_tokens
        self.tokens = torch.zeros(slots, n, dtype=torch.long, device=engine.device)
        self.t = torch.zeros(slots, dtype=torch.long, device=engine.device)

    def admit(self, slot: int, job: Job) -> None:
        self.jobs[slot] = job
        self.seeds[slot], self.counters[slot], self.t[slot] = job.seed, 0, 0
        self.fresh[slot] = True

    def step(self) -> list[Job]:
        """One engine step over the occupied slots; returns the jobs that finished."""
        spec, dev = self.spec, self.engine.device
        n_s, n_r = self.rows_in_use()
        if n_s == 0:
            return []
        jobs = self.jobs[:n_s]
        active = torch.tensor([j is not None for j in jobs], device=dev)
        fresh = self.fresh[:n_s]
        t = self.t[:n_s]
        cls = torch.tensor([j.cls if j is not None else 0 for j in jobs], device=dev)
        last = self.tokens[:n_s].gather(1, (t - 1).clamp(min=0)[:, None])[:, 0]
        feed = self.expand(torch.where(fresh, cls + spec.class_token_offset, last))
        if self.cfg:  # the uncond row of a fresh slot prefills the null class
            feed[1::2] = torch.where(fresh, torch.full_like(cls, spec.null_class + spec.class_token_offset), last)
        cache = self.cache_view(n_r)
        reset = self.expand(fresh | ~active)
        write = torch.where(reset, torch.zeros_like(cache.length), cache.length)
        pos = self.expand(torch.where(fresh, torch.full_like(t, -1), t - 1).clamp(min=-1))
        logits = self.engine.step(cache, feed[:, None], pos[:, None], write, cache.causal_mask(write, 1))[:, 0]
        cache.length.copy_(torch.where(reset, torch.full_like(write, spec.cond_len), cache.length + 1))
        fresh.zero_()
        p = self.params
        cfg_on = (p.cfg_interval < 0) | (t <= p.cfg_interval + 1) if self.cfg else False
        tok = sample_logits(self.guide(logits, cfg_on), p, self.draw(active, 1)[:n_s, 0])
        idx = t.clamp(max=spec.n_tokens - 1)[:, None]
        toks = self.tokens[:n_s]
        toks.scatter_(1, idx, torch.where(active[:, None], tok[:, None], toks.gather(1, idx)))
        t += active.long()
        done = []
        for i, j in enumerate(jobs):
            if j is not None and int(self.t[i]) == spec.n_tokens:
                j.tokens = self.tokens[i].clone()
                done.append(self.evict(i))
        return done


class ContinuousARPG(_Slots):
    """Continuous batching of ARPG's parallel decoding (per-image random orders)."""

    def __init__(self, engine, slots: int, params: SamplingParams, steps: int = 64, schedule: str = "arccos",
                 cfg_schedule: str = "linear"):
        if engine.spec.family != "arpg":
            raise ArexportError("continuous ARPG batching needs an ARPG model")
        super().__init__(engine, slots, params)
        n = self.spec.n_tokens
        self.sizes = tokens_per_step(n, min(steps, n), schedule)
        # Pads are written past each row's length; they fit when the last step is the largest (then
        # every live row has room for at least max(sizes) more slots). arccos/cosine schedules are.
        if self.sizes[-1] != max(self.sizes):
            raise ArexportError(f"continuous ARPG batching needs a schedule whose last step is its largest; {schedule} gives {self.sizes}")
        self.cfg_schedule = cfg_schedule
        self.starts = [sum(self.sizes[:k]) for k in range(len(self.sizes))]
        dev = engine.device
        self.order = torch.zeros(slots, n, dtype=torch.long, device=dev)
        self.seq = torch.zeros(slots, n, dtype=torch.long, device=dev)
        self.k = torch.zeros(slots, dtype=torch.long, device=dev)

    def admit(self, slot: int, job: Job) -> None:
        self.jobs[slot] = job
        self.seeds[slot], self.counters[slot], self.k[slot] = job.seed, 0, 0
        self.fresh[slot] = True
        u = uniforms(self.seeds[slot:slot + 1], self.counters[slot:slot + 1], self.spec.n_tokens)
        self.order[slot] = u[0].argsort()  # as ARPGMethod(order="row") draws it
        self.counters[slot] = 1

    def step(self) -> list[Job]:
        """One multi-query step over the occupied slots; returns the jobs that finished."""
        spec, dev = self.spec, self.engine.device
        n_s, n_r = self.rows_in_use()
        live = [i for i, j in enumerate(self.jobs[:n_s]) if j is not None]
        if not live:
            return []
        ks = {i: int(self.k[i]) for i in live}
        n_in = {i: 1 if ks[i] == 0 else self.sizes[ks[i] - 1] for i in live}
        n_q = {i: self.sizes[ks[i]] for i in live}
        N, M = max(n_in.values()), max(n_q.values())
        feed = torch.zeros(n_s, N, dtype=torch.long, device=dev)
        fpos = torch.zeros(n_s, N, dtype=torch.long, device=dev)
        qpos = torch.zeros(n_s, M, dtype=torch.long, device=dev)
        real_in = torch.ones(n_s, dtype=torch.long, device=dev)
        for i in live:
            k = ks[i]
            if k == 0:
                feed[i, 0] = self.jobs[i].cls + spec.class_token_offset
                fpos[i, 0] = -1
            else:
                a = self.starts[k - 1]
                feed[i, : n_in[i]] = self.seq[i, a:a + n_in[i]]
                fpos[i, : n_in[i]] = self.order[i, a:a + n_in[i]]
            real_in[i] = n_in[i]
            qpos[i, : n_q[i]] = self.order[i, self.starts[k]:self.starts[k] + n_q[i]]
        fresh = self.fresh[:n_s]
        feed = self.expand(feed)
        if self.cfg:  # the uncond row of a fresh slot feeds the null class
            feed[1::2, 0] = torch.where(fresh, torch.full_like(feed[1::2, 0], spec.null_class + spec.class_token_offset),
                                        feed[1::2, 0])
        active = torch.zeros(n_s, dtype=torch.bool, device=dev)
        active[live] = True
        cache = self.cache_view(n_r)
        reset = self.expand(fresh | ~active)
        write = torch.where(reset, torch.zeros_like(cache.length), cache.length)
        end = write + self.expand(real_in)
        visible = torch.arange(spec.s_max, device=dev).view(1, 1, -1) < end.view(-1, 1, 1)
        attn = visible.expand(-1, N, -1).unsqueeze(1)
        qmask = visible.expand(-1, M, -1).unsqueeze(1)
        logits = self.engine.multi_query_step(cache, feed, self.expand(fpos), write, attn, self.expand(qpos), qmask)
        cache.length.copy_(torch.where(self.expand(~active), torch.zeros_like(end), end))
        fresh.zero_()
        p = self.params
        if self.cfg:  # each slot at its own point of the guidance schedule
            scale = torch.tensor([guidance(p, self.cfg_schedule, self.starts[ks[i]] if i in ks else 0, spec.n_tokens).cfg_scale
                                  for i in range(n_s)], device=dev).view(n_s, 1, 1)
            logits = cfg_combine(self.cond_first(logits), scale)
        new = sample_from_probs(probs_from_logits(logits, p), self.draw(active, M))
        done = []
        for i in live:
            k, m = ks[i], n_q[i]
            self.seq[i, self.starts[k]:self.starts[k] + m] = new[i, :m]
            self.k[i] += 1
            if int(self.k[i]) == len(self.sizes):
                raster = torch.empty_like(self.seq[i])
                raster[self.order[i]] = self.seq[i]
                self.jobs[i].tokens = raster
                done.append(self.evict(i))
        return done
