"""`vvs`: verification skipping on top of draft-model speculative decoding with LANTERN acceptance.

Some rounds skip the target forward: the drafter's proposal, truncated to (running mean accepted
length - 1) tokens, is committed as is; those tokens stay *pending* and the next verified round
prepends them to its verify block, so their K/V enters the target cache then (the target's outputs
at those positions are not used to re-judge them). Never in the first 6 tokens of an image.

Policies: `uniform` skips every `skip_interval`-th round; `dynamic` skips when the previous round
was verified and the drafter's candidates agree — at each drafted position the top-`n_candidates`
tokens of the draft distribution have codebook latents whose mean pairwise cosine similarity,
weighted 0.9^j over positions j, is >= `sim_threshold`; `none` never skips (then vvs == lantern).
A batch skips a round only if every live row would. The drafter here is a separate model with
its own cache, so there are no target features to reuse: a skipped round uses only the draft's
distributions. Defaults follow the reference: interval 5, threshold 0.7, LANTERN delta 0.2.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from arexport.errors import ArexportError
from arexport.runtime.decoding.base import register
from arexport.runtime.decoding.sd import SD
from arexport.runtime.speculative import LanternRule, StandardRule

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


@register("vvs")
class VVS(SD):
    """SD + LANTERN acceptance + verification skipping."""

    def __init__(self, gamma: int = 4, policy: str = "uniform", skip_interval: int = 5, sim_threshold: float = 0.7,
                 n_candidates: int = 4, k: int = 1000, delta: float = 0.2, lam: Optional[float] = None):
        super().__init__(gamma=gamma)
        if policy not in POLICIES:
            raise ArexportError(f"vvs policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if skip_interval < 2:
            raise ArexportError(f"vvs skip interval must be >= 2 (a skipped round needs a verified one before), got {skip_interval}")
        self.policy, self.skip_interval, self.sim_threshold = policy, skip_interval, sim_threshold
        self.n_candidates = n_candidates
        self.lantern = dict(k=k, delta=delta, lam=lam)

    def start(self, st) -> None:
        if self.lantern["delta"] > 0 or self.lantern["lam"] is not None:
            self.rule = LanternRule(st.engine.neighbors(self.lantern["k"]), **self.lantern)
        else:
            self.rule = StandardRule()
        st.latents = st.draft.codebook() if self.policy == "dynamic" else None
        st.counted_rounds = 0

    def skip_size(self, st, drafts, q) -> int:
        m = self._skip_size(st, drafts, q)
        live = st.n < st.spec.n_tokens
        # (min committed tokens over live rows, skipped?) per round, for inspection
        st.decisions.append((int(st.n[live].min()) if bool(live.any()) else st.spec.n_tokens, m > 0))
        return m

    def _skip_size(self, st, drafts, q) -> int:
        live = st.n < st.spec.n_tokens
        if self.policy == "none" or not bool(live.any()) or bool((st.n[live] <= MIN_TOKENS).any()):
            return 0
        st.counted_rounds += 1
        if self.policy == "uniform":
            want = st.counted_rounds % self.skip_interval == 0
        else:
            sim = candidate_similarity(q[live], st.latents.to(q.device), self.n_candidates)
            want = (not st.last_skipped) and bool((sim >= self.sim_threshold).all())
        if not want:
            return 0
        mean_acc = sum(st.accepted) / len(st.accepted) if st.accepted else 1.0
        remaining = int((st.spec.n_tokens - st.n[live]).min())
        m = min(int(mean_acc - 1), drafts.shape[1], remaining - 1)
        return max(m, 0)
