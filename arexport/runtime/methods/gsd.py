"""`gsd`: Grouped Speculative Decoding — SJD's (or a draft model's) drafts accepted by cluster (lossy).

GSD (So et al., ICCV 2025) accepts a draft x when its *cluster* of visually equivalent tokens is
likely enough under the target, not x alone. For draft x at a position with target p and proposal q:

1. rank the vocabulary by p ascending (stable: ties by token id); x has rank r;
2. candidates: the tokens of ranks r - h .. r + h - 1 (h = `half`, 7 officially; clipped at the top);
   when r < h the official slice is empty and the lossless test min(1, p(x) / q(x)) applies;
3. the cluster keeps a candidate c when |p(c) - p(x)| < p_thr and the squared L2 distance between the
   codebook rows of x and c is < d_thr (x itself always qualifies);
4. accept with min(1, p(cluster) / q(cluster)); a rejection resamples from norm(max(0, p - q)) as SJD.

Differences from the official code (junhyukso/GSD): distances are between the VQ codebook rows
(the official code uses the language model's input-embedding rows of Lumina-mGPT, whose image
tokens have no separate codebook table here); ranks come from the target probabilities after
guidance and top-k/top-p, with ties (zero-probability tokens) broken by token id. GSD is lossy: the
output is not the target's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from arexport.errors import ArexportError
from arexport.runtime.methods.base import Method, Options, option, register
from arexport.runtime.methods.sd import SD, SDOptions
from arexport.runtime.methods.sjd import SJD, SJDOptions
from arexport.runtime.speculative import StandardRule, _ratio

DRAFTERS = {"sjd": SJD, "sd": SD}


class GSDRule(StandardRule):
    """GSD's grouped acceptance (module docstring); residual and bonus are the lossless rule's."""

    name = "gsd"

    def __init__(self, codebook: torch.Tensor, half: int = 7, p_thr: float = 0.15, d_thr: float = 0.5):
        if half < 1:
            raise ArexportError(f"gsd half-width must be >= 1, got {half}")
        if not (p_thr > 0 and d_thr > 0):
            raise ArexportError(f"gsd thresholds must be > 0, got p_thr {p_thr}, d_thr {d_thr}")
        self.codebook = codebook.float()
        self.half, self.p_thr, self.d_thr = half, p_thr, d_thr

    def clusters(self, p: torch.Tensor, x: torch.Tensor):
        """Candidates [..., 2h] of drafts x [...] under targets p [..., V], the cluster mask [..., 2h]
        and whether the official slice is non-empty (rank >= h) [...]."""
        v = p.shape[-1]
        order = torch.sort(p, dim=-1, stable=True).indices  # ascending
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(v, device=p.device).expand_as(order))
        r = rank.gather(-1, x[..., None])[..., 0]
        idx = r[..., None] - self.half + torch.arange(2 * self.half, device=p.device)
        inside = idx < v
        cand = order.gather(-1, idx.clamp(0, v - 1))
        px = p.gather(-1, x[..., None])
        cb = self.codebook.to(p.device)
        dist = (cb[cand] - cb[x][..., None, :]).square().sum(-1)
        mask = inside & ((p.gather(-1, cand) - px).abs() < self.p_thr) & (dist < self.d_thr)
        return cand, mask, r >= self.half

    def chain_acceptance(self, p, Q, x):
        cand, mask, sliced = self.clusters(p, x)
        m = mask.to(p.dtype)
        grouped = _ratio((p.gather(-1, cand) * m).sum(-1), (Q.at(x, cand) * m).sum(-1))
        return torch.where(sliced, grouped, self.acceptance(p, Q.prob(x), x))


@dataclass(frozen=True)
class GSDOptions(Options):
    drafter: str = option("sjd", "drafts GSD accepts by cluster: sjd (Jacobi drafts, the official setting) or sd "
                          "(a draft model)", flag="--drafter", choices=tuple(DRAFTERS))
    half: int = option(7, "cluster candidates: the tokens ranked within -half .. half - 1 of the draft by target "
                       "probability (official 7)", flag="--gsd-half")
    p_thr: float = option(0.15, "a candidate joins when its target probability is within p_thr of the draft's "
                          "(official 0.15)", flag="--gsd-p-thr")
    d_thr: float = option(0.5, "... and its squared L2 codebook distance to the draft is below d_thr (official 0.5, "
                          "on embeddings)", flag="--gsd-d-thr")
    gamma: Optional[int] = None  # sd drafter (its default)
    window: Optional[int] = None  # sjd drafter (its default)
    init: str = SJDOptions.__dataclass_fields__["init"].default
    start: int = 0
    end: Optional[int] = None

    def validate(self):
        if self.half < 1:
            raise ArexportError(f"gsd half must be >= 1, got {self.half}")
        if not (self.p_thr > 0 and self.d_thr > 0):
            raise ArexportError(f"gsd p_thr and d_thr must be > 0, got {self.p_thr}, {self.d_thr}")
        self.drafter_options().validate()
        return self

    def drafter_options(self) -> Options:
        if self.drafter == "sd":
            return SDOptions(gamma=self.gamma)
        return SJDOptions(window=self.window, init=self.init, start=self.start, end=self.end)


@register("gsd")
class GSD(Method):
    """A drafter whose acceptance is GSDRule."""

    Options = GSDOptions
    help = "Grouped Speculative Decoding: SJD's (or sd's) drafts accepted by clusters of similar tokens (LOSSY)"

    def requires_draft(self) -> bool:
        return self.options.drafter == "sd"

    def decoder(self, ctx, capacity):
        o = self.options
        rule = GSDRule(ctx.engine.codebook(), half=o.half, p_thr=o.p_thr, d_thr=o.d_thr)
        drafter = DRAFTERS[o.drafter](o.drafter_options())
        return drafter.decoder(type(ctx)(ctx.engine, ctx.params, o.drafter_options(), ctx.draft), capacity, rule=rule)
