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
# `prompt_idx` that the published signature lacks, so we follow skip_verify's own parameters); so
# `new_token` counts the tokens appended to `input_ids` before this step, which leaves out the step's
# root token (candidates[:, 0], the last sampled token).
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


# ---------------------------------------------------------------------------------------------------
# CoDe: czg1225/CoDe, commit bfb204de8648. infer_CoDe.py lines 118-131 (sample_CoDe.py lines 127-141:
# top_p 0.96, cfg 1.5): `newk = [600]*10`, `temp = [1.1]*7+[1.0]*3`, top_p=0.95, scale si sampled with
# top_k[si] and temp[si] (models/var.py lines 654-657 draft, refine alike). models/helpers.py
# `sample_with_top_k_top_p_` lines 7-25, on the guided logits: top-k removes logits below the k-th
# largest (line 11); top-p sorts ascending and removes where the running softmax mass <= 1 - top_p,
# never the largest (lines 14-17); only then divides by temp and draws from the softmax (lines 22-23).
# ---------------------------------------------------------------------------------------------------
def _official_code_probs(logits, top_k, top_p, temp):
    """The distribution sample_with_top_k_top_p_ draws from, for logits [..., V]."""
    x = logits.clone().double()
    if top_k > 0:  # (torch.topk fails for k > V: the official V is 4096; a no-op cut here)
        top_k = min(top_k, x.shape[-1])
        x = x.masked_fill(x < x.topk(top_k, dim=-1).values.amin(dim=-1, keepdim=True), float("-inf"))
    if top_p > 0:
        srt, order = x.sort(dim=-1, descending=False)
        drop = srt.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return (x / temp).softmax(dim=-1)


OFFICIAL_TEMPS = [1.1] * 7 + [1.0] * 3


def _code_sampler_mismatch(params_for):
    """Largest |difference| between ours (params_for(base) -> SamplingParams) and the official sampler
    over 10 scales of random logits (V = 1000 > top-k 600, so top-k and top-p both cut)."""
    from arexport.runtime.sampling import SamplingParams, probs_from_logits

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 7, 1000, generator=g) * 3  # [scale, position, V]
    params = params_for(SamplingParams(cfg_scale=1.5, cfg_schedule="ramp"))
    step = torch.arange(10)[:, None].expand(10, 7)
    ours = probs_from_logits(logits, params, step).double()
    want = torch.stack([_official_code_probs(logits[si], 600, 0.95, OFFICIAL_TEMPS[si]) for si in range(10)])
    assert int((want > 0).sum(-1).max()) < 600  # top-p cut below top-k's 600 somewhere...
    assert int((want > 0).sum(-1).min()) > 1
    return float((ours - want).abs().max())


def test_code_official_sampler_per_scale():
    from arexport.runtime.methods.var import code_sampler

    assert _code_sampler_mismatch(lambda p: code_sampler(p, 10)) < 1e-5


@pytest.mark.parametrize("perturb", ["filter after temperature", "one temperature"])
def test_code_official_sampler_negative_controls(perturb):
    from dataclasses import replace

    from arexport.runtime.methods.var import code_sampler

    if perturb == "filter after temperature":
        fn = lambda p: replace(code_sampler(p, 10), filter_first=False)  # noqa: E731
    else:
        fn = lambda p: replace(code_sampler(p, 10), temperatures=(1.0,) * 10)  # noqa: E731
    assert _code_sampler_mismatch(fn) > 1e-3


def _code_counts_and_official(head_gain=2.0, n=4000, cls=3):
    """Run `code` (sampled, the default official sampler) on a tiny VAR pair of 4 scales (CoDe's
    temperatures there: 1.1 at scale 0, 1.0 at the last three); return the scale-0 token counts [V],
    the counts of scale 1's 4 tokens among images whose scale-0 token is the most common one [4, V],
    and the transcription's logits for both ([V] and [4, V]; scale 0 is unguided: ramp t = 0)."""
    from tests.test_var import engine_of, ours_from_official, tiny_cfg
    from tests.var_official import official_pair

    from arexport.runtime.generator import Generator
    from arexport.runtime.sampling import SamplingParams

    drafter_off, quant = official_pair(4)
    refiner_off, _ = official_pair(5, depth=1)
    refiner_off.quant = (quant,)
    with torch.no_grad():
        drafter_off.head.weight.mul_(head_gain)  # peakier distributions: temperature and top-p matter
        drafter_off.head.bias.mul_(head_gain)
    cfg, rcfg = tiny_cfg(), tiny_cfg(depth=1)
    drafter, vae = ours_from_official(drafter_off, quant, cfg)
    refiner, _ = ours_from_official(refiner_off, quant, rcfg)
    gen = Generator(engine_of(drafter, vae, cfg), engine_of(refiner, vae, rcfg))
    out = gen.generate(classes=[cls] * n, seed=5, method="code", method_options={"drafter_steps": 2}, images=False,
                       sampling=SamplingParams(cfg_scale=1.5, cfg_schedule="ramp"), batch_size=1000, timings=False)
    toks = torch.from_numpy(out.tokens)
    c0 = torch.bincount(toks[:, 0], minlength=40)
    t0 = int(c0.argmax())
    c1 = torch.stack([torch.bincount(toks[toks[:, 0] == t0, 1 + j], minlength=40) for j in range(4)])
    seen = []

    def draw(logits):
        seen.append(logits[0].clone())
        return torch.full(logits.shape[:2], t0, dtype=torch.long)

    with torch.no_grad():
        drafter_off.infer(torch.tensor([cls]), 1.5, draw, stop=2)
    return c0, c1, seen[0][0], seen[1]


def _chi2_p(counts, probs):
    """Pearson chi-square p-value of counts [..., V] against probs [..., V] (rows pooled: the
    statistics and degrees of freedom add)."""
    from scipy.stats import chi2

    counts, probs = counts.reshape(-1, counts.shape[-1]).double(), probs.reshape(-1, probs.shape[-1])
    stat, df = 0.0, 0
    for c, p in zip(counts, probs):
        keep = p > 0
        assert float(c[~keep].sum()) == 0, "a token the sampler filters out was drawn"
        exp = p[keep] * c.sum()
        stat += float(((c[keep] - exp) ** 2 / exp).sum())
        df += int(keep.sum()) - 1
    return float(chi2.sf(stat, df))


def test_code_sampled_distribution_is_the_official_samplers():
    """Chi-square: scale 0 (drafter, temperature 1.1) and scale 1 given scale 0 (temperature 1.0),
    against the official sampler applied to the transcription's logits; the same counts reject the
    perturbed samplers (scale 0 at temperature 1.0; no top-p cut). Scale 1's temperature (1.0 vs
    1.1) is below this test's power; the per-scale choice is pinned by test_code_official_sampler_per_scale."""
    c0, c1, l0, l1 = _code_counts_and_official()
    top_p = 0.95
    assert _chi2_p(c0, _official_code_probs(l0, 600, top_p, 1.1)) > 1e-3
    assert _chi2_p(c1, _official_code_probs(l1, 600, top_p, 1.0)) > 1e-3
    # negative controls: the test has power against each perturbation
    assert _chi2_p(c0, _official_code_probs(l0, 600, top_p, 1.0)) < 1e-4
    assert _chi2_p(c0, _official_code_probs(l0, 600, 0.0, 1.1)) < 1e-4
    assert _chi2_p(c1, _official_code_probs(l1, 600, 0.0, 1.0)) < 1e-4


# ---------------------------------------------------------------------------------------------------
# GridAR: JoonHyung-Park/GridAR, commit 5f755efea146, GridAR-Janus-Pro/generator/janus_generator.py:
# the first checkpoint after `quarter = total_tokens // 4` tokens (lines 196-204), the second after
# `half = total_tokens // 2` (lines 207-222); the verifier's canvas pads with mode "repeat": after the
# first quarter tokens[:, q:2q], [2q:3q], [3q:4q] = tokens[:, :q] (lines 27-30), after the half
# tokens[:, half:] = tokens[:, :half] (lines 40-41). evaluate_gridar.py lines 281-288 / 340-347:
# without 3-way CFG the refined prompt replaces the prompt (2-way CFG on it).
# ---------------------------------------------------------------------------------------------------
def _official_pad_repeat(tokens, total):
    """The full-length canvas tokens for a generated prefix of a quarter or a half of `total`."""
    out = torch.zeros(tokens.shape[0], total, dtype=tokens.dtype)
    t = tokens.shape[1]
    if t == total // 4:
        for j in range(4):
            out[:, j * t:(j + 1) * t] = tokens
    elif t == total // 2:
        out[:, :t] = tokens
        out[:, t:] = tokens[:, :total - t]
    else:
        raise AssertionError(f"not an official checkpoint: {t} of {total}")
    return out


def _narrow_decoder(lm):
    """lm with a narrow random VQ-16 decoder (the same layers and x16 upsampling, 1/4 of the channels, one res
    block per level instead of three). What these tests pin is which tokens fill a canvas and which candidates
    the scorer sees, and any decoder shows that; the full-width random decoder cost the suite ~50 s decoding
    288 px canvases (grid 18) and ~25 s at grid 4, on one core."""
    from arexport.models.vq import VQConfig, VQDecoder

    lm.decoder = VQDecoder(VQConfig(codebook_size=lm.spec.vocab_size, ch=32, z_channels=32, num_res_blocks=0)).init_random(1).eval()
    return lm


def _gridar_seen(grid, split):
    from arexport.models.registry import load_model
    from arexport.runtime.backends.torch.runner import TorchEngine
    from arexport.runtime.generator import Generator
    from arexport.runtime.sampling import SamplingParams

    lm = _narrow_decoder(load_model("llamagen-c2i-B", random_init=True,
                                    overrides={"n_layer": 1, "dim": 32, "n_head": 2, "grid_size": grid, "multiple_of": 32}))
    engine = TorchEngine(lm)
    seen = []

    def verifier(partial):
        seen.append((partial.tokens.clone(), partial.canvas.clone()))
        return torch.tensor([True, False, True, True])

    scorer = lambda im, c: im.float().mean((1, 2, 3))  # noqa: E731
    Generator(engine).generate(classes=[1], seeds=[4], method="gridar", sampling=SamplingParams(cfg_scale=2.0), images=False,
                               method_options=dict(candidates=4, verifier=verifier, scorer=scorer, split=split))
    return engine, seen


@pytest.mark.parametrize("grid", [18, 8])
def test_gridar_checkpoints_and_canvas_are_the_officials(grid):
    total = grid * grid
    engine, seen = _gridar_seen(grid, "tokens")
    assert [t.shape[1] for t, _ in seen] == [total // 4, total // 2]
    for tokens, canvas in seen:
        assert torch.equal(canvas, engine.decode_images(_official_pad_repeat(tokens, total)))


def test_gridar_negative_control_whole_rows():
    """split=rows, the previous behaviour, prunes grid 18 after 4 rows (72 tokens), not 81."""
    _, seen = _gridar_seen(18, "rows")
    assert [t.shape[1] for t, _ in seen] == [72, 162]
    with pytest.raises(AssertionError, match="not an official checkpoint"):
        _official_pad_repeat(seen[0][0], 324)


def test_gridar_replace_guidance_is_cfg_on_the_reformulated_caption():
    """guidance=replace: a reformulation that returns the original caption changes nothing; 3-way
    CFG at w3 = 0 ignores the reformulated caption entirely, while replace follows it."""
    from arexport.families import Conditions
    from arexport.models.registry import load_model
    from arexport.runtime.backends.torch.runner import TorchEngine
    from arexport.runtime.generator import Generator
    from arexport.runtime.sampling import SamplingParams

    lm = _narrow_decoder(load_model("llamagen-t2i-B", random_init=True, seed=2,
                                    overrides={"n_layer": 2, "dim": 64, "n_head": 4, "grid_size": 4, "multiple_of": 32,
                                               "cls_token_num": 6, "caption_dim": 32}))
    gen = Generator(TorchEngine(lm))
    emb = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0))

    def run(reformulate=None, **opts):
        res = gen.generate(captions=emb, seeds=[9], method="gridar", sampling=SamplingParams(cfg_scale=3.0), images=False,
                           method_options=dict(candidates=4, verifier="accept-all", reformulate=reformulate,
                                               scorer=lambda images, c: images.float().mean((1, 2, 3)), **opts))
        return res.extras[0]["candidate_tokens"]

    same = lambda partial, c: c  # noqa: E731
    other = lambda partial, c: Conditions(embeds=c.embeds * -1.0, mask=c.mask)  # noqa: E731
    base = run()
    assert torch.equal(run(same, guidance="replace"), base)
    assert torch.equal(run(other, w3=0.0), base)  # 3-way at w3 = 0: not the official ablation
    assert not torch.equal(run(other, guidance="replace"), base)
