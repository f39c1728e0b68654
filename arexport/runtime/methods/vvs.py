"""`vvs`: verification skipping on top of draft-model speculative decoding with LANTERN acceptance.

Some rounds skip the target forward. The schedule is the official `skip_verify` (HyattDD/VVS
`models/skip_utils_llamagen.py` lines 61-90, commit 7790173). Its `new_token` counts the tokens
committed before the round *without* the round's root token (the token the drafts continue from,
which `update_inference_inputs_skip` adds to `new_token` only in the round that commits it); here
an image's count n includes that token, so new_token = n - 1. Never while new_token <= 5;
`uniform` skips round r (the loop index `idx`, counted from 0 over all of the image's rounds,
skipped ones included; `steps_in_first_row` stays 0 in `ea_llamagen.py`'s `generate`) when
r % skip_interval == 1; `dynamic` skips when the previous round was verified and the drafter's
candidate paths agree: every second path (the official down-sampling) compared position by position
through the cosine similarity of their codebook latents, weighted 0.9^j over positions j and
averaged over path pairs, >= sim_threshold; `none` never skips (then vvs == lantern).

A skipped round commits what the official skip branch commits (`skip_evaluate` then
`update_inference_inputs_skip` with `cur_skip=True`, `skip_utils_llamagen.py` lines 119-151 and
276-287, 428-429): a path truncated to the mean path length - 1 drafts (a chain has one path of g
drafts, so accept_length = g), of which the root and the first g - 1 drafts are appended and draft g
becomes the next round's root. In this runtime's count (root included) that is the g drafts: n grows
by g, as the official `new_token` does, and no token is drawn from the cached target distribution
(the official `reuse_logits` sample is not read on the skip branch). The committed tokens stay
*pending*: the next verified round prepends them to its verify block, so their K/V enters the target
cache then (the official `tree_decoding_skip_llamagen` feeds `last_skip_tokens` the same way).
Candidate paths of a chain drafter are the top-`n_candidates` tokens of the draft distribution at
each drafted position (the EAGLE tree's top-k per depth). Each image decides for itself; images that
skip sit out the round's target forward. Defaults follow the reference: interval 5, threshold 0.7,
LANTERN delta 0.2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from arexport.errors import ArexportError
from arexport.runtime.methods.base import Method, Options, RowStats, option, register
from arexport.runtime.methods.sd import SDDecoder
from arexport.runtime.speculative import LANTERN_RULES, LanternRule, StandardRule, check_lantern

POLICIES = ("uniform", "dynamic", "none")
MIN_TOKENS = 5  # skip_verify never skips while new_token (committed tokens before the root) <= 5


def candidate_similarity(q: torch.Tensor, latents: torch.Tensor, n_candidates: int = 4, decay: float = 0.9) -> torch.Tensor:
    """[B]: the official path similarity for a chain's candidate paths (the top-n_candidates tokens at
    each drafted position, rank r making path r), down-sampled to every second path: exp-decay
    (0.9^j, normalised) weighted sum over positions of the pairwise cosine similarity of the paths'
    codebook latents, averaged over path pairs. Fewer than 2 paths give 0 (never skip), as officially.
    q: [B, g, V] draft distributions; latents [V, d]."""
    b, g, _ = q.shape
    top = q.topk(min(n_candidates, q.shape[-1]), dim=-1).indices[..., ::2]  # [B, g, c] every second path
    if top.shape[-1] < 2:
        return torch.zeros(b, device=q.device)
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
        check_lantern(self.k, self.delta, self.lam, self.rule)
        return self


@dataclass
class VVSStats(RowStats):
    """An image's VVS statistics: its skipped rounds and every skip decision."""

    skipped_rounds: int = 0  # rounds committed without a target forward
    decisions: list[tuple[int, bool]] = field(default_factory=list)  # (tokens done, skipped?) per round

    @classmethod
    def run_fields(cls, rows, events, forwards_per_image):
        return {"skipped_rounds": sum(r.skipped_rounds for r in rows)}


class VVSDecoder(SDDecoder):
    row_stats = VVSStats

    def __init__(self, ctx, capacity):
        o = ctx.options
        rule = LanternRule(ctx.engine.neighbors(o.k + 1), k=o.k, delta=o.delta, lam=o.lam, rule=o.rule,
                           greedy=ctx.params.greedy) if o.delta > 0 or o.lam is not None else StandardRule()
        super().__init__(ctx, capacity, rule)
        self.latents = ctx.draft.codebook() if o.policy == "dynamic" else None
        self.rounds = self.slots.image_tensor(())  # the official loop index: rounds so far, skipped ones included
        self.last_skipped = self.slots.image_tensor((), torch.bool)

    def start(self, a, b, conds):
        super().start(a, b, conds)
        self.rounds[a:b], self.last_skipped[a:b] = 0, False

    def skip(self, g, drafts, q):
        """[n] drafts each image commits unverified this round: g_i on a skip, else 0."""
        o, s = self.opts, self.slots
        m = torch.zeros_like(g)
        for i in range(s.n):
            gi, ni, st = int(g[i]), int(self.n[i]), s.stats[i]
            r = int(self.rounds[i])
            self.rounds[i] += 1  # every round of the image counts, as the official idx does
            if gi == 0:  # nothing drafted (the image's last token): nothing to skip
                continue
            new_token = ni - 1  # the official count leaves out the root token tokens[n - 1]
            want = False
            if o.policy != "none" and new_token > MIN_TOKENS:
                if o.policy == "uniform":
                    want = r % o.skip_interval == 1
                else:
                    sim = candidate_similarity(q[i:i + 1, :gi], self.latents.to(q.device), o.n_candidates)
                    want = not bool(self.last_skipped[i]) and bool(sim[0] >= o.sim_threshold)
            st.decisions.append((ni, want))
            m[i] = gi if want else 0  # g drafts: the last one is the next round's root (g <= tokens left - 1)
        self.last_skipped[: s.n] = m > 0
        return m


@register("vvs")
class VVS(Method):
    """SD + LANTERN acceptance + verification skipping."""

    Options = VVSOptions
    decoder_class = VVSDecoder
    needs_draft = True
    help = "verification skipping on top of sd + LANTERN: some rounds commit drafts without a target forward"
