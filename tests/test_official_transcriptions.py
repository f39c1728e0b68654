"""Official decoding rules, re-derived here from the official sources read line by line.

Each `_official_*` function below is written from the cited lines of the official repository (its
file, commit and line range in the docstring), independently of arexport's implementation: nothing
here imports the code under test to compute an expected value. Each test has a negative control: a
perturbed implementation (the mistake the toolkit used to make, or a plausible transcription slip)
that the same check rejects, so the check can fail.
"""

from __future__ import annotations

import pytest
import torch

from arexport.runtime.speculative import LanternRule

# ---------------------------------------------------------------------------------------------------
# LANTERN: jadohu/LANTERN models/ea_model_llamagen.py, commit 3a56e45, `evaluate_posterior_v1`
# (the path `generate(static_tree=True)` calls, lines 1110-1119), sampled branch lines 597-669.
# Variables: `gtp` = softmax(logits_processor(target logits)) at the position (line 608-610), so it is
# already temperature-scaled and top-k/top-p filtered (zeros possible); `nearest_latents[x]` = the
# other codebook rows by L2 distance, nearest first, x itself excluded (entrypoints/
# generate_codebook.py lines 55-59, diagonal set to inf); `lantern_delta > 1` means LANTERN++'s
# lambda (lines 624-627); `q` = `op[i-1][...]`, the drafter's softmax(logits_processor(logits)) row
# the draft was sampled from (models/drafters/cnets_llamagen.py lines 924-928, 974); for a chain the
# sibling list `b_indices[j][i]` is empty.
# ---------------------------------------------------------------------------------------------------


def _official_lantern_v1(p, q, x, nearest, k, delta):
    """(acceptance probability of x, normalised resampling distribution after rejecting x).

    Lines 620-635: px = gtp[x]; cumsum of gtp over nearest[x, :k]; `indices` = last position whose
    cumsum <= delta (<= (delta - 1) px when delta > 1), -1 if none; px += cumsum[indices].
    Line 639-640: accepted iff r <= px / qx, r ~ U[0, 1): probability min(1, px / qx).
    Lines 646-661 (rejection): q is copied; if indices != -1 (the FIRST neighbour's cumsum is within
    the bound, whatever its mass) q[nearest[x, :k + 1]] = 0; gtp = max(gtp - q, 0); all-zero -> ones;
    normalise."""
    px = float(p[x])
    nb = [int(t) for t in nearest[x, :k]]
    cum, run = [], 0.0
    for t in nb:
        run += float(p[t])
        cum.append(run)
    bound = (delta - 1.0) * px if delta > 1.0 else delta
    within = [i for i, c in enumerate(cum) if c <= bound]
    last = within[-1] if within else -1
    if last != -1:
        px = px + cum[last]
    acc = min(1.0, px / float(q[x]))
    qq = q.clone()
    if last != -1:
        for t in nearest[x, :k + 1]:
            qq[int(t)] = 0.0
    g = (p - qq).clamp(min=0.0)
    if float(g.sum()) == 0.0:
        g = torch.ones_like(g)
    return acc, g / g.sum()


def _l2_nearest(codebook):
    """generate_codebook.py lines 55-59: cdist p=2, diagonal inf, topk smallest, all V - 1."""
    v = codebook.shape[0]
    d = torch.cdist(codebook, codebook, p=2)
    d.fill_diagonal_(float("inf"))
    return torch.topk(d, v - 1, dim=-1, largest=False).indices


def _topk_filtered(logits, top_k):
    """Softmax after keeping the top_k logits (LANTERN's logits_processor with top-k): zeros elsewhere."""
    kth = logits.topk(top_k).values[-1]
    return torch.softmax(logits.masked_fill(logits < kth, float("-inf")), 0)


def _lantern_cases(seed=5, n=300):
    """Random (p, q, x, nearest, k, delta) with sampled drafts, top-k-filtered targets (zero-probability
    neighbours), one-hot drafts and LANTERN++ lambdas."""
    g = torch.Generator().manual_seed(seed)
    v = 10
    for i in range(n):
        nearest = _l2_nearest(torch.randn(v, 3, generator=g))
        lp = torch.randn(v, generator=g).double() * 2
        p = _topk_filtered(lp, int(torch.randint(2, v + 1, (1,), generator=g))) if i % 2 else torch.softmax(lp, 0)
        kind = i % 3
        if kind == 2:  # one-hot proposal (SJD's repeated / random tokens)
            x = int(torch.randint(v, (1,), generator=g))
            q = torch.nn.functional.one_hot(torch.tensor(x), v).double()
        else:  # sampled draft from a (possibly top-k filtered) drafter distribution
            lq = torch.randn(v, generator=g).double() * 2
            q = _topk_filtered(lq, 4) if kind == 1 else torch.softmax(lq, 0)
            x = int(torch.multinomial(q.float(), 1, generator=g))
        k = int(torch.randint(1, v - 1, (1,), generator=g))
        delta = [0.05, 0.1, 0.2, 0.4, 2.0, 3.5][i % 6]  # > 1: LANTERN++ lambda, as the official code reads it
        yield p, q, x, nearest, k, delta


def _ours(p, q, x, nearest, k, delta, rule_class=LanternRule):
    lam = delta if delta > 1.0 else None
    rule = rule_class(nearest, k=k, delta=0.0 if lam else delta, lam=lam)
    X = torch.tensor([x])
    acc = float(rule.accept_prob(p[None], q[None], X)[0])
    r = rule.residual(p[None], q[None], X)[0]
    return acc, r / r.sum()


def _lantern_mismatches(rule_class):
    """Cases where rule_class differs from the official acceptance or (where rejection is possible)
    the official resampling distribution."""
    bad = []
    for p, q, x, nearest, k, delta in _lantern_cases():
        want_a, want_r = _official_lantern_v1(p, q, x, nearest, k, delta)
        got_a, got_r = _ours(p, q, x, nearest, k, delta, rule_class)
        if abs(got_a - want_a) > 1e-9 or (want_a < 1.0 and not torch.allclose(got_r, want_r, atol=1e-9)):
            bad.append((x, k, delta))
    return bad


class _ZeroesTheResidual(LanternRule):
    """Negative control, the old toolkit rule: neighbours zeroed in max(0, p - q), not in q."""

    def residual(self, p, q, x):
        _, removed = self.credit(p, q.gather(-1, x[..., None])[..., 0], x)
        removed = removed.scatter(-1, x[:, None], True)
        return (p - q).clamp(min=0).masked_fill(removed, 0.0)


class _RemovesOnlyWithPooledMass(LanternRule):
    """Negative control, the old condition: neighbours removed only when the pooled mass is > 0."""

    def residual(self, p, q, x):
        m, take = self.pooled(p, x)
        table = self.table.to(p.device)[x]
        removed = torch.zeros(p.shape, dtype=torch.bool).scatter(-1, table, (m > 0)[..., None].expand_as(table))
        return (p - q.masked_fill(removed, 0.0)).clamp(min=0)


def test_lantern_official_acceptance_and_residual_sampled_topk_onehot():
    assert _lantern_mismatches(LanternRule) == []
    # both sides exercised: rejections happen, neighbours get removed, some with zero mass
    cases = list(_lantern_cases())
    assert sum(_official_lantern_v1(*c)[0] < 1.0 for c in cases) > 100
    zero_first = [c for c in cases if float(c[0][c[3][c[2], 0]]) == 0.0]
    assert len(zero_first) > 20


@pytest.mark.parametrize("control", [_ZeroesTheResidual, _RemovesOnlyWithPooledMass])
def test_lantern_negative_controls_are_rejected(control):
    assert len(_lantern_mismatches(control)) > 5


def test_lantern_worked_example_residual():
    """x = 0 rejected; its nearest neighbours 1, 2, 3; k = 1 (so k + 1 = 2 neighbours leave q);
    p(1) = 0.05 pooled (<= 0.1): official residual max(0, p - q') with q'(1) = q'(2) = 0 is
    [0, .05, .15, .20] / .4 = [0, .125, .375, .5]; the old toolkit rule gave [0, 0, 0, 1]."""
    p = torch.tensor([0.05, 0.05, 0.15, 0.75]).double()
    q = torch.tensor([0.35, 0.10, 0.00, 0.55]).double()
    nb = torch.tensor([[1, 2, 3], [0, 2, 3], [1, 0, 3], [2, 1, 0]])
    want = torch.tensor([0.0, 0.125, 0.375, 0.5]).double()
    _, off = _official_lantern_v1(p, q, 0, nb, 1, 0.1)
    assert torch.allclose(off, want)
    _, ours = _ours(p, q, 0, nb, 1, 0.1)
    assert torch.allclose(ours, want)
    _, old = _ours(p, q, 0, nb, 1, 0.1, _ZeroesTheResidual)
    assert torch.allclose(old, torch.tensor([0.0, 0.0, 0.0, 1.0]).double())


def test_lantern_zero_probability_first_neighbour_still_removes():
    """Top-k filtering left x's nearest neighbour at 0: cumsum 0 <= delta, so `indices` = 0 != -1
    and q loses its mass on x's k + 1 neighbours although nothing was pooled."""
    p = torch.tensor([0.2, 0.0, 0.3, 0.5]).double()
    q = torch.tensor([0.5, 0.3, 0.2, 0.0]).double()
    nb = torch.tensor([[1, 2, 3], [0, 2, 3], [1, 0, 3], [2, 1, 0]])
    a, want = _official_lantern_v1(p, q, 0, nb, 1, 0.1)
    assert a == pytest.approx(0.4)
    assert torch.allclose(want, torch.tensor([0.0, 0.0, 0.3, 0.5]).double() / 0.8)  # q(2) = 0.2 left q
    got_a, got = _ours(p, q, 0, nb, 1, 0.1)
    assert got_a == pytest.approx(a) and torch.allclose(got, want)
    _, old = _ours(p, q, 0, nb, 1, 0.1, _RemovesOnlyWithPooledMass)
    assert not torch.allclose(old / old.sum(), want)  # (p - q)+ = [0, 0, .1, .5]


def test_lantern_one_step_output_distribution_is_the_officials():
    """The exact output of one verification step (draft x ~ q, accept or resample), summed over x,
    official vs ours, on sampled drafts over top-k-filtered targets."""
    g = torch.Generator().manual_seed(9)
    v = 8
    for _ in range(40):
        nearest = _l2_nearest(torch.randn(v, 2, generator=g))
        p = _topk_filtered(torch.randn(v, generator=g).double() * 2, 5)
        q = torch.softmax(torch.randn(v, generator=g).double() * 2, 0)
        k, delta = 2, 0.15
        outs = {}
        for name, fn in (("official", _official_lantern_v1), ("ours", _ours)):
            out = torch.zeros(v, dtype=torch.float64)
            for x in range(v):
                if q[x] == 0:
                    continue
                a, r = fn(p, q, x, nearest, k, delta)
                out += q[x] * (a * torch.nn.functional.one_hot(torch.tensor(x), v).double() + (1 - a) * r)
            outs[name] = out
        assert torch.allclose(outs["ours"], outs["official"], atol=1e-9)


# ---------------------------------------------------------------------------------------------------
# VVS: HyattDD/VVS, commit 77901736dbc5.
# models/skip_utils_llamagen.py `skip_verify` lines 61-90: `if new_token <= 5: return False`; uniform:
# `cur_step -= steps_in_1st_row; return cur_step % skip_interval == 1` (lines 77-81); dynamic: never
# right after a skipped step (lines 83-84).
# models/ea_llamagen.py `generate`: `new_token = 0` after `initialize_tree_v2` sampled the first token
# (lines 420, 214-241), `steps_in_first_row = 0` and never changed (line 427), `idx` the loop index over
# all steps, skipped ones included (line 433; the call at lines 446-459 passes an extra leading
# `prompt_idx` that the published signature lacks, so we follow skip_verify's own parameters); so `new_token` counts the tokens appended to `input_ids`
# before this step, which leaves out the step's root token (candidates[:, 0], the last sampled token).
# `update_inference_inputs_skip` lines 276-287 and 428-431: a skipped step appends candidates[best,
# :accept_length] (root + accept_length - 1 drafts) and drafts next from candidates[best, accept_length],
# `new_token += accept_length`; a verified step appends root + accept_length accepted drafts and samples
# a new root, `new_token += accept_length + 1`. `skip_evaluate` lines 119-151 on a chain (one path of
# g drafts, no -1): avg_acp_len = (g + 1) // 1, last_acp_token_index = g, accept_length = min(g, g) = g.
# ---------------------------------------------------------------------------------------------------
def _official_skip_verify_uniform(idx, new_token, skip_interval):
    if new_token <= 5:
        return False
    return idx % skip_interval == 1


def _vvs_mismatches(rows, gamma, n_tokens, interval=5):
    """Rounds where a run's records (per round: tokens done n incl. the root, skipped?; tokens the
    round committed) disagree with the official schedule and bookkeeping."""
    bad = []
    for i, row in enumerate(rows):
        new_token = 0  # the official count after the first sampled token
        for idx, ((n_done, skipped), committed) in enumerate(zip(row.decisions, row.accepted)):
            if n_done - 1 != new_token:
                bad.append((i, idx, "count"))
            if skipped != _official_skip_verify_uniform(idx, new_token, interval):
                bad.append((i, idx, "decision"))
            if skipped:
                g = min(gamma, n_tokens - n_done - 1)  # the chain the round drafted
                if committed != g:  # accept_length = g; new_token += g
                    bad.append((i, idx, "content"))
            new_token += committed
    return bad


def _vvs_rows(gamma=4):
    from arexport.models.registry import load_model
    from arexport.runtime.backends.torch.runner import TorchEngine
    from arexport.runtime.generator import Generator
    from arexport.runtime.sampling import SamplingParams

    gen = Generator(TorchEngine(load_model("demo")), TorchEngine(load_model("demo-draft")))
    res = gen.generate(classes=list(range(10)), seed=3, method="vvs", method_options={"policy": "uniform", "gamma": gamma},
                       sampling=SamplingParams(cfg_scale=1.5), batch_size=10, images=False, timings=False)
    return res.rows, gen.spec.n_tokens


def test_vvs_uniform_schedule_and_skipped_round_content_are_the_officials():
    rows, n_tokens = _vvs_rows()
    assert _vvs_mismatches(rows, 4, n_tokens) == []
    assert sum(s for r in rows for _, s in r.decisions) >= 10  # skips happen
    # the edge the threshold decides: a round 1 (idx % 5 == 1) reached with new_token == 5 exactly
    assert any(r.decisions[1][0] == 6 for r in rows)


def test_vvs_negative_control_old_threshold(monkeypatch):
    """Comparing the count that includes the root token with 5 (the old off-by-one) skips at n = 6."""
    import arexport.runtime.methods.vvs as vvs

    monkeypatch.setattr(vvs, "MIN_TOKENS", 4)
    rows, n_tokens = _vvs_rows()
    assert any(kind == "decision" for *_, kind in _vvs_mismatches(rows, 4, n_tokens))


def test_vvs_negative_control_extra_stale_token(monkeypatch):
    """Committing one token more than the chain on a skip (the old g + 1) is caught."""
    import torch as _t

    from arexport.runtime.methods.sd import SDDecoder
    from arexport.runtime.methods.vvs import VVSDecoder

    def commit_one_more(self, drafts, m, skipping):
        chain = _t.cat([drafts, drafts[:, -1:]], 1)
        SDDecoder._commit_unverified(self, chain, _t.where(skipping, m + 1, 0), skipping)

    monkeypatch.setattr(VVSDecoder, "_commit_unverified", commit_one_more, raising=False)
    rows, n_tokens = _vvs_rows()
    assert any(kind == "content" for *_, kind in _vvs_mismatches(rows, 4, n_tokens))
