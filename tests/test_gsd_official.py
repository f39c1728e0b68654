"""GSD parity with the official grouped acceptance (same uniforms: same accepted runs).

The reference is re-derived, in this file's own code, from junhyukso/GSD at commit
4216c7c2bd5d04be12410adb07143af4cd7f7b88, scheduler/jacobi_iteration_lumina_mgpt.py:
* lines 286-366 (`__call__` of the speculative sampler): per chain, drafts left to right; the draft's
  rank in the target logits sorted ascending, the candidates `sorted[rank - 7 : rank + 7]` (a Python
  slice: empty when rank < 7, then lines 336-337 fall back to min(1, p(x)/q(x))); keep candidates
  with |p(c) - p(x)| < 0.15 and distance < 0.5; accept when r < min(1, sum p / sum q) over the kept
  ones, stop at the first rejection;
* line 1199 (distances: |a|^2 + |b|^2 - 2 a.b between embedding rows; here the codebook rows, see
  arexport/runtime/methods/gsd.py).
Ties in the sort (zero-probability tokens after top-k) are broken by token id on both sides (the
official torch.sort leaves their order unspecified).
"""

from __future__ import annotations

import pytest
import torch

from arexport.runtime.methods.gsd import GSDRule
from arexport.runtime.speculative import Proposals, SampledProposals, verify_chain


def official_runs(p, logits, q, drafts, u, cb, half=7, p_thr=0.15, d_thr=0.5):
    """Accepted-run length per chain, the official way (loops, Python slices)."""
    sims = (cb.square().sum(-1, keepdim=True) + cb.T.square().sum(0, keepdim=True)) - 2 * cb @ cb.T
    out = []
    for b in range(drafts.shape[0]):
        k = drafts.shape[1]
        for i in range(drafts.shape[1]):
            x = int(drafts[b, i])
            order = torch.sort(logits[b, i], stable=True).indices
            rank = int(torch.nonzero(order == x)[0, 0])
            sl = order[rank - half:rank + half]
            if len(sl) == 0:  # the official `.max()` of an empty slice raises: the except branch
                accept = min(1.0, float(p[b, i, x] / q[b, i, x]))
            else:
                keep = ((p[b, i, sl] - p[b, i, x]).abs() < p_thr) & (sims[x, sl] < d_thr)
                accept = min(1.0, float((p[b, i, sl] * keep).sum() / (q[b, i, sl] * keep).sum()))
            if not float(u[b, i]) < accept:
                k = i
                break
        out.append(k)
    return torch.tensor(out)


def case(seed, v=37, b=64, l=5, top_k=0, one_hot=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, l + 1, v, generator=g) * 1.5
    if top_k:
        kth = logits.topk(top_k, -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    p = torch.softmax(logits, -1)
    q = torch.softmax(torch.randn(b, l, v, generator=g) * 1.5, -1)
    drafts = torch.multinomial(q.view(-1, v), 1, generator=g).view(b, l)  # sampled, not one-hot
    if one_hot:  # SJD's new random drafts: q = 1 at the draft
        q = torch.nn.functional.one_hot(drafts, v).float()
    u = torch.rand(b, l, generator=g) * 0.6  # enough acceptances to reach later drafts
    cb = torch.randn(v, 3, generator=g) * 0.45  # distances straddle d_thr
    return p, logits, q, drafts, u, cb


def ours(p, q, drafts, u, cb, rule_cls=GSDRule, proposals=None):
    b, l = drafts.shape
    Q = proposals if proposals is not None else Proposals(q)
    res = verify_chain(p, Q, drafts, torch.full((b,), l), u, None, rule_cls(cb))
    return res.accepted


@pytest.mark.parametrize("top_k,one_hot", [(0, False), (9, False), (0, True)])
def test_accepted_runs_equal_official(top_k, one_hot):
    for seed in range(3):
        p, logits, q, drafts, u, cb = case(seed, top_k=top_k, one_hot=one_hot)
        ref = official_runs(p[:, :-1], logits[:, :-1], q, drafts, u, cb)
        assert torch.equal(ours(p, q, drafts, u, cb), ref)
        assert 0 < ref.float().mean() < drafts.shape[1]  # decisions go both ways


def test_sampled_proposals_read_the_same_clusters():
    """SJD's proposals (rows of an earlier step, one-hot where -1) give the tensor path's decisions."""
    p, logits, q, drafts, u, cb = case(7)
    b, l, v = q.shape
    index = torch.arange(b * l).view(b, l)
    index[:, 2] = -1
    qt = q.clone()
    qt[:, 2] = torch.nn.functional.one_hot(drafts[:, 2], v).float()
    sp = SampledProposals(q.reshape(-1, v), index, drafts, v)
    assert torch.equal(ours(p, qt, drafts, u, cb, proposals=sp), official_runs(p[:, :-1], logits[:, :-1], qt, drafts, u, cb))


class InclusiveSlice(GSDRule):
    """Perturbed: candidates rank - 7 .. rank + 7 inclusive (15 tokens)."""

    def clusters(self, p, x):
        h = self.half
        cand, mask, sliced = super().clusters(p, x)
        v = p.shape[-1]
        order = torch.sort(p, dim=-1, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(v).expand_as(order)).gather(-1, x[..., None])
        extra = order.gather(-1, (rank + h).clamp(max=v - 1))
        cb = self.codebook
        ok = (rank + h < v) & ((p.gather(-1, extra) - p.gather(-1, x[..., None])).abs() < self.p_thr) & \
            ((cb[extra] - cb[x][..., None, :]).square().sum(-1) < self.d_thr)
        return torch.cat([cand, extra], -1), torch.cat([mask, ok], -1), sliced


class NoDistance(GSDRule):
    """Perturbed: no codebook-distance filter."""

    def __init__(self, cb):
        super().__init__(cb, d_thr=1e9)


@pytest.mark.parametrize("perturbed", [InclusiveSlice, NoDistance])
def test_negative_controls_are_rejected(perturbed):
    differs = False
    for seed in range(3):
        p, logits, q, drafts, u, cb = case(seed)
        ref = official_runs(p[:, :-1], logits[:, :-1], q, drafts, u, cb)
        differs |= not torch.equal(ours(p, q, drafts, u, cb, rule_cls=perturbed), ref)
    assert differs
