"""`var` and `code`: next-scale decoding (VAR) and collaborative decoding (CoDe) over the scale-block step.

`var` follows VAR's `autoregressive_infer_cfg`: each step feeds one whole scale of every live image
(its Cvae next-scale inputs; the first scale is the class embedding), samples all its tokens at
once from logits guided at the scale's ramp t = cfg * k / (S - 1) (the sampler's `ramp`
schedule, scale 1 + t), looks them up in the codebook and lets the VQVAE add them to the image's
f_hat and make the next scale's inputs. An image takes S steps (10 at 256 px). Images at different
scales share one step: each row feeds its own scale, padded to the step's largest (the pads fall in
the row's own future slots, which its next scales overwrite before anything sees them).

`code` is CoDe (czg1225/CoDe): the model the generator was loaded with drafts scales 0..N-1
(N = `drafter_steps`), then the refiner (`--refiner`) takes over. Its first step feeds every
position of scales 0..N at once under the block-causal mask - the drafter's next-scale inputs, as the
official `autoregressive_infer_cfg_refine` does with its token hub - and samples scale N; it then
decodes the remaining scales alone.

`code`'s sampler is CoDe's by default (`sampler=official`, czg1225/CoDe `infer_CoDe.py` lines
118-131 and `models/helpers.py` `sample_with_top_k_top_p_` lines 7-25): top-k 600 and top-p 0.95 on
the guided logits, then the scale's temperature, 1.1 for scales 0..6 and 1.0 for the last three
(`temp = [1.1]*7+[1.0]*3` at 10 scales; at S scales 1.1 for all but the last three, our
extension). Its guidance scale stays the sampler's (the official scripts use 1.5; VAR's demo 4.0).
`sampler=given` samples with the sampling options as given, like `var`.

`more_smooth` (VAR's option for visual quality) replaces a scale's codebook rows by a Gumbel-softmax
mix at temperature max(0.27 (1 - 0.95 r), 0.005) of the (top-k/top-p filtered) logits times (1 + r),
r = k / (S - 1); the image then comes from f_hat, not from the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from arexport.errors import ArexportError
from arexport.families.base import Conditions
from arexport.runtime.methods.base import CFGRows, Decoder, Finished, Method, Options, RowStats, option, register
from arexport.runtime.sampling import filter_rows, probs_from_logits, sample_from_probs


@dataclass(frozen=True)
class VAROptions(Options):
    more_smooth: bool = option(False, "Gumbel-softmax mix of codebook rows instead of the sampled rows (VAR's "
                               "more_smooth: smoother images; the image is decoded from f_hat)", flag="--more-smooth")


@dataclass(frozen=True)
class CoDeOptions(VAROptions):
    drafter_steps: Optional[int] = option(None, "scales the drafter generates before the refiner takes over "
                                          "(default: all but the last two, the official 8 of 10)", flag="--drafter-steps")
    sampler: str = option("official", "official: CoDe's sampler (top-k 600, top-p 0.95 before a per-scale temperature "
                          "1.1 then 1.0 for the last 3 scales; replaces --temperature/--top-k/--top-p); given: the "
                          "sampling options as given", choices=("official", "given"))


def code_sampler(params, n_scales: int):
    """CoDe's official sampler for n_scales scales (the guidance options kept): top-k 600, top-p
    0.95, filtering before temperature, temperature 1.1 except 1.0 on the last three scales.
    Temperature 0 stays greedy (filtering and temperature do not move the argmax)."""
    if params.greedy:
        return params
    temps = tuple([1.1] * max(n_scales - 3, 0) + [1.0] * min(n_scales, 3))
    return replace(params, temperature=1.0, top_k=600, top_p=0.95, temperatures=temps, filter_first=True)


def runs(mask: list[bool]) -> list[tuple[int, int]]:
    """Maximal [a, b) ranges where mask is True."""
    out, a = [], None
    for i, m in enumerate(mask + [False]):
        if m and a is None:
            a = i
        elif not m and a is not None:
            out.append((a, i))
            a = None
    return out


class VARDecoder(Decoder):
    """One scale per step for every live image (subclass: CoDe's two engines)."""

    def __init__(self, ctx, capacity: int):
        super().__init__(ctx, capacity, 2 if ctx.params.uses_cfg else 1)
        spec, s = self.spec, self.slots
        self.sc = self.engine.family.scales(spec)
        self.S = len(self.sc)
        self.cfg = CFGRows(ctx.params, self.S)  # the guidance schedule runs over scales (VAR's ramp)
        self.check_sampling(ctx.params)  # a batch whose own sampling is wrong fails at once, not at its first image
        cvae, hw = self.engine.family.latent_channels(spec), self.sc.patch_nums[-1]
        self.codebook = self.engine.codebook().float()
        self.k = s.image_tensor(())  # next scale
        self.tokens = s.image_tensor((self.sc.total,))
        self.inputs = s.image_tensor((self.sc.total, cvae), torch.float32)  # next-scale inputs at each position
        self.f_hat = s.image_tensor((cvae, hw, hw), torch.float32)
        self.classes = s.row_tensor((), torch.int64)
        self.caches = {id(self.engine): s.cache(self.engine.allocate(capacity * self.cfg.per_image))}

    def sampling_of(self, p):
        if p.temperatures and len(p.temperatures) != self.S:
            raise ArexportError(f"per-scale temperatures: got {len(p.temperatures)} for {self.S} scales")
        return p

    def cache_of(self, engine):
        return self.caches[id(engine)]

    def start(self, a: int, b: int, conds: Conditions) -> None:
        r0, r1 = self.slots.rows_of(a, b)
        self.classes[r0:r1] = self.cfg.conditions(self.engine, conds).classes
        self.k[a:b] = 0

    # -- one engine call over images [a, b) ------------------------------------------------------------
    def forward(self, engine, a: int, b: int, begin: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Feed positions [begin, begin + q) of images [a, b) (padded to the largest q) through
        `engine`; returns per-row logits [rows, Q, V]."""
        cfg, s = self.cfg, self.slots
        Q = int(q.max())
        pos = (begin[:, None] + torch.arange(Q, device=s.device)).clamp(max=self.sc.total - 1)
        feats = self.inputs[a:b].gather(1, pos[..., None].expand(-1, -1, self.inputs.shape[-1]))
        view = self.cache_of(engine).view(*s.rows_of(a, b))
        r0, r1 = s.rows_of(a, b)
        pos_r = cfg.expand(pos)
        return engine.scale_step(view, cfg.expand(feats), pos_r, self.classes[r0:r1], cfg.expand(begin),
                                 self.sc.visible_mask(pos_r, view.s_max))

    def sample(self, logits: torch.Tensor, k: torch.Tensor, a: int, b: int):
        """Tokens [n, Q] and their h rows [n, Q, Cvae] for images [a, b) at scales k [n], from per-row
        logits [rows, Q, V] (position j of an image's scale at index j), each from its own stream."""
        s, Q, params = self.slots, logits.shape[1], self.sampling(a, b)
        if self.cfg.per_image == 2:
            logits = self.cfg.guide(logits, k[:, None].expand(-1, Q), params)
        step = k[:, None].expand(-1, Q)  # the scale index: per-scale temperatures, for images that have them
        tok = sample_from_probs(probs_from_logits(logits, params, step), s.uniform(Q, s.span(a, b))[a:b])
        if not self.opts.more_smooth:
            return tok, self.codebook[tok]
        # the reference filters its logits in place while sampling, so the mix sees the top-k/top-p-filtered ones
        filtered = filter_rows(logits.float(), params)
        r = (k.float() / max(self.S - 1, 1))[:, None, None]
        tau = torch.clamp(0.27 * (1 - r * 0.95), min=0.005)
        u = s.uniform(Q * logits.shape[-1], s.span(a, b))[a:b].view(b - a, Q, -1).clamp(1e-12, 1 - 1e-7)
        mix = torch.softmax((filtered * (1 + r) - torch.log(-torch.log(u)).float()) / tau, dim=-1)
        return tok, mix @ self.codebook

    def commit(self, a: int, b: int, k: torch.Tensor, tok: torch.Tensor, h: torch.Tensor) -> None:
        """Store images [a, b)'s tokens of scales k and let the VQVAE add them to f_hat (one call per scale)."""
        for si in sorted(set(k.tolist())):
            sel = (k == si).nonzero().flatten()
            rows, q = sel + a, self.sc.sizes[si]
            self.tokens[rows, self.sc.begins[si]:self.sc.ends[si]] = tok[sel, :q]
            f, nxt = self.engine.next_scale(si, self.f_hat[rows], h[sel, :q])
            self.f_hat[rows] = f.float()
            if nxt is not None:
                self.inputs[rows, self.sc.begins[si + 1]:self.sc.ends[si + 1]] = nxt.float()
        self.k[a:b] += 1

    def scale_step(self, engine, a: int, b: int) -> None:
        """One step of images [a, b) through `engine`: each image's next scale."""
        k = self.k[a:b]
        q = self.sc.table("sizes", self.slots.device)[k]
        logits = self.forward(engine, a, b, self.sc.table("begins", self.slots.device)[k], q)
        self.commit(a, b, k, *self.sample(logits, k, a, b))

    def advance(self) -> list[int]:
        n = self.slots.n
        self.scale_step(self.engine, 0, n)
        self.count(0, n, "forwards")
        return self.slots.where(self.k[:n] == self.S)

    def count(self, a: int, b: int, field: str) -> None:
        """Images [a, b) took part in one more call of an engine (`forwards` or `refiner_forwards`)
        and committed their last scale."""
        for st, k in zip(self.slots.stats[a:b], self.k[a:b].tolist()):
            setattr(st, field, getattr(st, field) + 1)
            st.accepted.append(self.sc.sizes[k - 1])

    def finish(self, i: int) -> Finished:
        out = self.finished(i, self.tokens[i].clone())
        if self.opts.more_smooth:
            out.latents = self.f_hat[i].clone()
        return out


@register("var")
class VARMethod(Method):
    """Next-scale decoding: one forward per scale."""

    Options = VAROptions
    decoder_class = VARDecoder
    help = "VAR next-scale prediction: one step per scale (the default for VAR models)"


@dataclass
class CoDeStats(RowStats):
    """An image's CoDe statistics: `forwards` counts the drafter's (the model's) calls."""

    refiner_forwards: int = 0  # refiner engine calls it took part in

    @classmethod
    def run_fields(cls, rows, events, forwards_per_image):
        refiner = sum(r.refiner_forwards for r in rows) / len(rows) if rows else 0.0
        return {"drafter_forwards_per_image": forwards_per_image, "refiner_forwards_per_image": float(refiner)}

    @classmethod
    def summary(cls, stats):
        drafter, refiner = stats["drafter_forwards_per_image"], stats["refiner_forwards_per_image"]
        out = f"{drafter:.1f} drafter + {refiner:.1f} refiner forwards per image"
        if drafter + refiner and stats["tokens_per_image"] != round(drafter + refiner):
            out += f", {stats['tokens_per_image'] / (drafter + refiner):.2f} tokens per forward"
        return out


class CoDeDecoder(VARDecoder):
    """The drafter (the generator's model) takes scales 0..N-1, the refiner the rest."""

    row_stats = CoDeStats

    def __init__(self, ctx, capacity: int):
        super().__init__(ctx, capacity)
        if ctx.draft is None:
            raise ArexportError("method code needs a refiner model: pass --refiner NAME|DIR")
        self.refiner = ctx.draft
        n = self.S - 2 if self.opts.drafter_steps is None else self.opts.drafter_steps
        if not 1 <= n <= self.S - 1:
            raise ArexportError(f"code drafter_steps must be in [1, {self.S - 1}] for {self.S} scales, got {n}")
        if self.sc.ends[n] > self.refiner.max_q:
            raise ArexportError(f"the refiner's first step feeds {self.sc.ends[n]} positions, more than its engine's "
                                f"maximum query length {self.refiner.max_q}: rebuild it with --verify-len {self.sc.total}")
        self.N = n
        self.caches[id(self.refiner)] = self.slots.cache(self.refiner.allocate(capacity * self.cfg.per_image))

    def sampling_of(self, p):
        p = super().sampling_of(p)
        return code_sampler(p, self.S) if self.opts.sampler == "official" else p

    def advance(self) -> list[int]:
        n, N = self.slots.n, self.N
        phase = self.k[:n].tolist()
        for a, b in runs([k < N for k in phase]):  # drafting
            self.scale_step(self.engine, a, b)
            self.count(a, b, "forwards")
        for a, b in runs([k == N for k in phase]):  # the refiner's entry: scales 0..N at once
            k = self.k[a:b]
            end = self.sc.ends[N]
            zeros = torch.zeros_like(k)
            logits = self.forward(self.refiner, a, b, zeros, torch.full_like(k, end))[:, self.sc.begins[N]:end]
            self.commit(a, b, k, *self.sample(logits, k, a, b))
            self.count(a, b, "refiner_forwards")
        for a, b in runs([k > N for k in phase]):  # refining
            self.scale_step(self.refiner, a, b)
            self.count(a, b, "refiner_forwards")
        return self.slots.where(self.k[:n] == self.S)


@register("code")
class CoDeMethod(Method):
    """Collaborative decoding: a large drafter for the first scales, a small refiner for the rest."""

    Options = CoDeOptions
    decoder_class = CoDeDecoder
    needs_draft = True
    second_engine = "--refiner"
    help = "CoDe: the model drafts the first scales, a smaller VAR (--refiner) refines the rest"
