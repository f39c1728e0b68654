"""`vvs`: verification skipping on top of draft-model speculative decoding with LANTERN acceptance.

Some rounds skip the target forward: the drafter's proposal, truncated to (the image's running mean
accepted length - 1) tokens, is committed as is; those tokens stay *pending* and the next verified
round prepends them to its verify block, so their K/V enters the target cache then (the target's
outputs at those positions are not used to re-judge them). Never in the first 6 tokens of an image.

Policies: `uniform` skips every `skip_interval`-th round; `dynamic` skips when the previous round
was verified and the drafter's candidates agree — at each drafted position the top-`n_candidates`
tokens of the draft distribution have codebook latents whose mean pairwise cosine similarity,
weighted 0.9^j over positions j, is >= `sim_threshold`; `none` never skips (then vvs == lantern).
Each image decides for itself; the images that skip sit out the round's target forward. The drafter
here is a separate model with its own cache, so there are no target features to reuse: a skipped
round uses only the draft's distributions. Defaults follow the reference: interval 5, threshold
0.7, LANTERN delta 0.2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from arexport.errors import ArexportError
from arexport.runtime.methods.base import Method, Options, option, register
from arexport.runtime.methods.sd import SDDecoder
from arexport.runtime.speculative import LANTERN_RULES, LanternRule, StandardRule

POLICIES = ("uniform", "dynamic", "none")
MIN_TOKENS = 6


def candidate_similarity(q: torch.Tensor, latents: torch.Tensor, n_candidates: int = 4, decay: float = 0.9) -> torch.Tensor:
    """[B]: exp-decay weighted mean over draft positions of the mean pairwise cosine similarity of
    the top-n_candidates tokens' codebook latents. q: [B, g, V] draft distributions; latents [V, d]."""
    b, g, _ = q.shape
    top = q.topk(min(n_candidates, q.shape[-1]), dim=-1).indices  # [B, g, c]
    z = F.normalize(latents.float()[top], dim=-1)  # [B, g, c, d]
    sim = z @ z.transpose(-1, -2)  # [B, g, c, c]
    c = top.shape[-1]
    off = ~torch.eye(c, dtype=torch.bool, device=q.device)
    per_pos = (sim * off).sum((-1, -2)) / max(c * (c - 1), 1)  # [B, g]
    w = decay ** torch.arange(g, device=q.device, dtype=per_pos.dtype)
    return (per_pos * w).sum(-1) / w.sum()


@dataclass(frozen=True)
class VVSOptions(Options):
    gamma: Optional[int] = None  # sd's default
    policy: str = option("uniform", "when to skip verification", flag="--policy", choices=POLICIES)
    skip_interval: int = option(5, "uniform: skip every N-th round", flag="--skip-interval")
    sim_threshold: float = option(0.7, "dynamic: candidate latent cosine similarity to skip", flag="--sim-threshold")
    n_candidates: int = option(4, "dynamic: draft candidates compared per position")
    k: int = 1000
    delta: float = 0.2
    lam: Optional[float] = None
    rule: str = option("official", "LANTERN acceptance rule: official or capped (see lantern)", choices=LANTERN_RULES)

    def validate(self):
        if self.gamma is not None and self.gamma < 1:
            raise ArexportError(f"vvs gamma must be >= 1, got {self.gamma}")
        if self.skip_interval < 2:
            raise ArexportError(f"vvs skip interval must be >= 2 (a skipped round needs a verified one before), got {self.skip_interval}")
        if not 0 <= self.delta <= 1:
            raise ArexportError(f"lantern delta must be in [0, 1], got {self.delta}")
        return self


class VVSDecoder(SDDecoder):
    def __init__(self, ctx, capacity):
        o = ctx.options
        rule = LanternRule(ctx.engine.neighbors(o.k + 1), k=o.k, delta=o.delta, lam=o.lam, rule=o.rule,
                           greedy=ctx.params.greedy) if o.delta > 0 or o.lam is not None else StandardRule()
        super().__init__(ctx, capacity, rule)
        self.latents = ctx.draft.codebook() if o.policy == "dynamic" else None
        self.counted = self.slots.image_tensor(())  # rounds past the first tokens
        self.last_skipped = self.slots.image_tensor((), torch.bool)

    def skip(self, g, drafts, q):
        o, s = self.opts, self.slots
        m = torch.zeros_like(g)
        for i in range(s.n):
            gi, ni, st = int(g[i]), int(self.n[i]), s.stats[i]
            if gi == 0:
                continue
            mi = 0
            if o.policy != "none" and ni > MIN_TOKENS:
                self.counted[i] += 1
                if o.policy == "uniform":
                    want = int(self.counted[i]) % o.skip_interval == 0
                else:
                    sim = candidate_similarity(q[i:i + 1, :gi], self.latents.to(q.device), o.n_candidates)
                    want = not bool(self.last_skipped[i]) and bool(sim[0] >= o.sim_threshold)
                if want:
                    mean_acc = sum(st.accepted) / len(st.accepted) if st.accepted else 1.0
                    mi = max(min(int(mean_acc - 1), gi, self.spec.n_tokens - ni - 1), 0)
            st.decisions.append((ni, mi > 0))
            m[i] = mi
        self.last_skipped[: s.n] = m > 0
        return m


@register("vvs")
class VVS(Method):
    """SD + LANTERN acceptance + verification skipping."""

    Options = VVSOptions
    decoder_class = VVSDecoder
    needs_draft = True
    help = "verification skipping on top of sd + LANTERN: some rounds commit drafts without a target forward"
