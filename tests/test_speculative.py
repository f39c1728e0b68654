"""Speculative methods: lossless against exactly enumerated distributions, LANTERN's TV bound,
and identical tokens across backends."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from arexport.models.registry import load_model
from arexport.runtime.backends.torch.runner import TorchEngine
from arexport.runtime.generator import Generator
from arexport.runtime.sampling import SamplingParams, cfg_scales, filter_logits
from arexport.format.arrays import latent_neighbors
from arexport.runtime.speculative import LanternRule, StandardRule

ENUM = dict(vocab_size=3, num_classes=2, grid_size=2, dim=32, n_layer=2, n_head=2, multiple_of=32)


def _tiny(seed, std=0.6):
    lm = load_model("llamagen-c2i-B", random_init=True, seed=seed, overrides=dict(ENUM))
    lm.model.init_random(seed, std=std)
    for layer in lm.model.layers:  # keep the residual stream well-conditioned at this std
        layer.attention_norm.weight.data.fill_(1.0)
    return lm


@pytest.fixture(scope="module")
def enum_models():
    return _tiny(11), _tiny(12)


def exact_distribution(lm, cls: int, params: SamplingParams) -> np.ndarray:
    """P(sequence) for all 3^4 sequences under the guided, filtered conditionals (teacher forcing)."""
    seqs = torch.tensor(list(itertools.product(range(3), repeat=4)))
    n = len(seqs)
    with torch.no_grad():
        lc = lm.model(torch.full((n,), cls), seqs)
        if params.uses_cfg:
            lu = lm.model(torch.full((n,), 2), seqs)  # null class
            scale = cfg_scales(params, torch.arange(4), 4)  # row t predicts token t
            scale = scale.view(1, 4, 1) if isinstance(scale, torch.Tensor) else scale
            lc = lu + scale * (lc - lu)
        lc = lc / params.temperature
        lc = filter_logits(lc, params.top_k, params.top_p)
        logp = torch.log_softmax(lc, -1).gather(-1, seqs[..., None])[..., 0].sum(-1)
    return logp.exp().double().numpy()


def sample_counts(gen, method, params, n, opts=None, seed=0) -> np.ndarray:
    res = gen.generate(classes=[1] * n, method=method, method_options=opts or {}, sampling=params, seed=seed,
                       batch_size=n, images=False, timings=False)
    idx = (res.tokens * np.array([27, 9, 3, 1])).sum(1)
    return np.bincount(idx, minlength=81), res.stats


def chi2_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit, pooling cells with expected count < 5 into one."""
    n = counts.sum()
    exp = probs / probs.sum() * n
    assert counts[exp == 0].sum() == 0, "sampled a sequence of probability zero"
    big = exp >= 5
    obs = np.append(counts[big], counts[~big].sum())
    e = np.append(exp[big], exp[~big].sum())
    keep = e > 0
    return chisquare(obs[keep], e[keep]).pvalue


N = 12000
CASES = [SamplingParams(cfg_scale=2.0), SamplingParams(temperature=0.8, top_k=2, cfg_scale=1.0)]


@pytest.mark.parametrize("params", CASES, ids=["cfg2", "t0.8-top2"])
@pytest.mark.parametrize("method,opts", [("ar", {}), ("sjd", {"window": 3}), ("sjd", {"window": 4, "init": "repeat_horizon"}),
                                         ("sd", {"gamma": 2}), ("sd", {"gamma": 3}), ("lantern", {"gamma": 2, "delta": 0.0})])
def test_lossless_against_exact_distribution(enum_models, method, opts, params):
    target, draft = enum_models
    gen = Generator(TorchEngine(target), TorchEngine(draft))
    probs = exact_distribution(target, 1, params)
    seed = {"ar": 1, "sjd": 2, "sd": 3, "lantern": 4}[method] + 10 * len(opts)
    counts, stats = sample_counts(gen, method, params, N, opts, seed=seed)
    assert chi2_p(counts, probs) > 1e-3
    if method != "ar":
        assert stats["mean_accepted_length"] > 1.2  # drafts really were accepted


SCHEDULED = SamplingParams(cfg_scale=4.0, cfg_schedule="cosine", cfg_power=1.0)  # 1, 1.44, 2.5, 3.56 over 4 tokens


@pytest.mark.parametrize("method,opts", [("ar", {}), ("sjd", {"window": 4}), ("sd", {"gamma": 3})])
def test_lossless_under_a_guidance_schedule_that_changes_inside_the_window(enum_models, method, opts):
    """Every position of a Jacobi window / verify block is guided at its own scale: still exact."""
    target, draft = enum_models
    gen = Generator(TorchEngine(target), TorchEngine(draft))
    counts, stats = sample_counts(gen, method, SCHEDULED, N, opts, seed=77)
    assert chi2_p(counts, exact_distribution(target, 1, SCHEDULED)) > 1e-3
    # power: the constant-scale distribution at the same g is rejected
    assert chi2_p(counts, exact_distribution(target, 1, SamplingParams(cfg_scale=4.0))) < 1e-6
    if method != "ar":
        assert stats["mean_accepted_length"] > 1.2


def test_chi_square_has_power(enum_models):
    """The same test rejects a wrong distribution: sampling with CFG vs the unguided distribution."""
    target, draft = enum_models
    gen = Generator(TorchEngine(target), TorchEngine(draft))
    counts, _ = sample_counts(gen, "sjd", CASES[0], N, {"window": 3})
    wrong = exact_distribution(target, 1, SamplingParams(cfg_scale=1.0))
    assert chi2_p(counts, wrong) < 1e-6
    # and the draft model's own distribution differs from the target's
    assert chi2_p(counts, exact_distribution(draft, 1, CASES[0])) < 1e-6


def _one_step_output(rule, p, q):
    """Exact output distribution of one speculative step: draft x ~ q, accept or resample."""
    v = p.shape[0]
    xs = torch.arange(v)
    P, Q = p.expand(v, v), q.expand(v, v)
    a = rule.accept_prob(P, Q, xs)
    r = rule.residual(P, Q, xs)
    r = r / r.sum(-1, keepdim=True)
    return q * a + ((q * (1 - a))[:, None] * r).sum(0)


@pytest.mark.parametrize("onehot", [False, True], ids=["soft-draft", "one-hot-draft"])
def test_lantern_capped_rule_output_within_tv_bound(onehot):
    """rule=capped keeps its guarantee: one speculative step's output is within TV delta of p."""
    g = torch.Generator().manual_seed(0)
    v = 6
    worst = -1.0
    for _ in range(400):
        temp = float(torch.rand(1, generator=g)) * 5
        p = torch.softmax(torch.randn(v, generator=g).double() * temp, 0)
        nb = latent_neighbors(torch.randn(v, 2, generator=g), v - 1)
        delta = float(torch.rand(1, generator=g)) * 0.4
        rule = LanternRule(nb, k=v - 1, delta=delta, rule="capped")
        if onehot:  # SJD-style: a deterministic draft x has q = one-hot(x); average over x
            outs = []
            for x in range(v):
                q = torch.nn.functional.one_hot(torch.tensor(x), v).double()
                outs.append(_one_step_output(rule, p, q))
            out = torch.stack(outs).mean(0)
            ref = p  # each one-hot proposal's output is compared through the mixture
        else:
            q = torch.softmax(torch.randn(v, generator=g).double() * temp, 0)
            out = _one_step_output(rule, p, q)
            ref = p
        tv = 0.5 * (out - ref).abs().sum().item()
        worst = max(worst, tv - delta)
        assert abs(out.sum().item() - 1) < 1e-9
    assert worst <= 1e-9, worst


def test_lantern_relaxation_is_real_and_delta_zero_is_exact():
    p = torch.tensor([0.05, 0.30, 0.25, 0.20, 0.20]).double()
    q = torch.tensor([0.60, 0.10, 0.10, 0.10, 0.10]).double()
    nb = torch.tensor([[1, 2, 3, 4], [0, 2, 3, 4], [1, 0, 3, 4], [2, 1, 0, 4], [3, 2, 1, 0]])
    out_std = _one_step_output(StandardRule(), p, q)
    assert torch.allclose(out_std, p, atol=1e-12)
    for r in ("official", "capped"):
        out0 = _one_step_output(LanternRule(nb, k=4, delta=0.0, rule=r), p, q)
        assert torch.allclose(out0, p, atol=1e-12)
    rule = LanternRule(nb, k=4, delta=0.35, rule="capped")
    a_std = StandardRule().accept_prob(p[None], q[None], torch.tensor([0]))
    a_lan = rule.accept_prob(p[None], q[None], torch.tensor([0]))
    assert a_lan > a_std + 0.1  # neighbour mass raises acceptance of token 0
    tv = 0.5 * (_one_step_output(rule, p, q) - p).abs().sum()
    assert 0 < tv <= 0.35


@pytest.fixture(scope="module")
def demo_gen():
    return Generator(TorchEngine(load_model("demo")), TorchEngine(load_model("demo-draft")))


def test_greedy_speculative_equals_greedy_ar(demo_gen):
    g = SamplingParams(temperature=0.0, cfg_scale=1.5)
    ref = demo_gen.generate(classes=list(range(10)), method="ar", sampling=g, images=False).tokens
    for method, opts in [("sjd", {}), ("sjd", {"init": "repeat_horizon", "window": 7}), ("sd", {"gamma": 5}), ("lantern", {"delta": 0.0})]:
        out = demo_gen.generate(classes=list(range(10)), method=method, method_options=opts, sampling=g, images=False, batch_size=4)
        assert np.array_equal(out.tokens, ref), (method, opts)


def test_demo_marginals_match_ar_and_forwards_drop(demo_gen):
    n = 600
    params = SamplingParams(cfg_scale=1.5)
    cls = [i % 10 for i in range(n)]
    pinned = {"ar": {}, "sjd": {"window": 16}, "sd": {"gamma": 4}}  # lossless at main's fixed lengths
    runs = {m: demo_gen.generate(classes=cls, method=m, method_options=pinned[m], sampling=params, seed=s, batch_size=200,
                                 images=False)
            for m, s in (("ar", 1), ("sjd", 2), ("sd", 3))}
    for m in ("sjd", "sd"):
        pvals = []
        for pos in range(64):
            a = np.bincount(runs["ar"].tokens[:, pos], minlength=17)
            b = np.bincount(runs[m].tokens[:, pos], minlength=17)
            keep = (a + b) > 0
            if keep.sum() < 2:
                continue
            pvals.append(chi2_contingency(np.stack([a[keep], b[keep]]))[1])
        assert min(pvals) > 1e-4 / 1, (m, min(pvals))  # 64 tests; a Bonferroni-style floor
        assert runs[m].stats["target_forwards_per_image"] < 0.7 * runs["ar"].stats["target_forwards_per_image"]
        assert runs[m].stats["mean_accepted_length"] > 1.5
    assert runs["sd"].stats["draft_forwards"] > 0 and runs["sjd"].stats["draft_forwards"] == 0


def test_lantern_delta_zero_equals_sd_token_for_token(demo_gen):
    params = SamplingParams(cfg_scale=1.5)
    a = demo_gen.generate(classes=list(range(10)) * 2, method="sd", method_options={"gamma": 3}, sampling=params, seed=5, images=False)
    b = demo_gen.generate(classes=list(range(10)) * 2, method="lantern", method_options={"gamma": 3, "delta": 0.0}, sampling=params, seed=5, images=False)
    assert np.array_equal(a.tokens, b.tokens)
    c = demo_gen.generate(classes=list(range(10)) * 2, method="lantern", method_options={"gamma": 3, "delta": 0.3}, sampling=params, seed=5, images=False)
    assert c.stats["mean_accepted_length"] >= a.stats["mean_accepted_length"]


def test_bad_method_options():
    from arexport.errors import ArexportError
    from arexport.runtime.methods import make_method

    with pytest.raises(ArexportError, match="sjd window must be >= 2"):
        make_method("sjd", window=1)
    with pytest.raises(ArexportError, match="sjd init must be one of"):
        make_method("sjd", init="zeros")
    with pytest.raises(ArexportError, match="method sd has no option 'window'"):
        make_method("sd", window=3)
    with pytest.raises(ArexportError, match="lantern drafter must be one of sd, sjd"):
        make_method("lantern", drafter="ar")
    with pytest.raises(ArexportError, match="sjd window must be int, got 'wide'"):
        make_method("sjd", window="wide")
    gen = Generator(TorchEngine(load_model("demo")))
    with pytest.raises(ArexportError, match="needs a draft model"):
        gen.generate(classes=[1], method="sd", images=False)


# -- LANTERN's neighbour table (the acceptance and residual: tests/test_official_transcriptions.py) ----
def _nearest(codebook):
    """generate_codebook.py: L2 distances of the raw rows, self excluded, nearest first."""
    d = torch.cdist(codebook, codebook, p=2)
    d.fill_diagonal_(float("inf"))
    return torch.topk(d, codebook.shape[0] - 1, dim=-1, largest=False).indices


def test_neighbours_equal_a_full_stable_sort_with_ties():
    """latent_neighbors keeps k + a margin of candidates per row (topk) instead of sorting the whole row; its
    table must equal a full stable sort of every distance row (ties by code index), also where more codes
    are tied at the k-th distance than the margin holds (those rows are fully sorted) and k is past V."""
    from arexport.format.arrays import TIE_MARGIN

    def full_sort(cb, k):
        d = torch.cdist(cb, cb)
        d.fill_diagonal_(float("inf"))
        return torch.argsort(d, dim=1, stable=True)[:, :min(k, cb.shape[0] - 1)]

    g = torch.Generator().manual_seed(0)
    ties = torch.randint(0, 3, (1500, 2), generator=g).float()  # 9 distinct rows: hundreds tied at every distance
    assert (torch.cdist(ties[:1], ties) == 1.0).sum() > TIE_MARGIN  # the full-sort path runs
    for cb in (ties, torch.randn(1500, 8, generator=g)):
        for k in (1, TIE_MARGIN, 300, 5000):
            assert torch.equal(latent_neighbors(cb, k, chunk=512), full_sort(cb, k)), k


def test_neighbours_are_the_official_table_on_a_fixed_codebook():
    g = torch.Generator().manual_seed(4)
    cb = torch.randn(40, 8, generator=g) * torch.linspace(0.1, 3.0, 40)[:, None]  # raw rows of unequal norms
    assert torch.equal(latent_neighbors(cb, 39), _nearest(cb))
    from arexport.models.vq import VQDecoder

    dec = VQDecoder().init_random(3)
    assert torch.equal(dec.codebook(), dec.quantize.embedding.weight)  # raw rows, as generate_codebook.py reads them


def test_official_credit_is_not_capped_worked_example():
    """Soft draft: q(x) = 0.5, p(x) = 0.1, neighbours hold 0.1 within delta = 0.15: official accepts with
    (0.1 + 0.1) / 0.5 = 0.40; the capped rule credits at most delta q(x) = 0.075 -> 0.35."""
    p = torch.tensor([0.1, 0.1, 0.3, 0.5]).double()
    q = torch.tensor([0.5, 0.2, 0.2, 0.1]).double()
    nb = torch.tensor([[1, 2, 3], [0, 2, 3], [1, 0, 3], [2, 1, 0]])
    x = torch.tensor([0])
    assert float(LanternRule(nb, k=3, delta=0.15).accept_prob(p[None], q[None], x)) == pytest.approx(0.40)
    assert float(LanternRule(nb, k=3, delta=0.15, rule="capped").accept_prob(p[None], q[None], x)) == pytest.approx(0.35)


def test_official_greedy_variant():
    """Temperature 0: x is kept iff it is the argmax of softmax(logits) with p(x) raised to p~(x)."""
    from arexport.runtime.speculative import verify_chain

    nb = torch.tensor([[1, 2, 3], [0, 2, 3], [1, 0, 3], [2, 1, 0]])
    rule = LanternRule(nb, k=3, delta=0.2, greedy=True)
    logits = torch.log(torch.tensor([[0.30, 0.15, 0.40, 0.15]]))
    P = rule.target_probs(logits, SamplingParams(temperature=0.0))
    assert torch.allclose(P, torch.tensor([[0.30, 0.15, 0.40, 0.15]]), atol=1e-6)
    # x = 0: p~ = 0.30 + 0.15 (neighbour 1; adding 2 would pass 0.2) = 0.45 > 0.40: accepted
    assert float(rule.accept_prob(P, P, torch.tensor([0]))) == 1.0
    # x = 3: p~ = 0.15 + 0.15 (neighbour 2 is 0.40 > 0.2: nothing pooled... cum[0] = 0.4) -> 0.15: rejected
    assert float(rule.accept_prob(P, P, torch.tensor([3]))) == 0.0
    two = torch.cat([P, P])[None]  # one chain of one draft plus the bonus position
    res = verify_chain(two, P[None], torch.tensor([[3]]), torch.tensor([1]), torch.zeros(1, 1), torch.tensor([0.99]), rule)
    assert res.accepted.tolist() == [0] and res.token.tolist() == [2]  # the next token is argmax p
    std = LanternRule(nb, k=3, delta=0.0, greedy=True)
    assert float(std.accept_prob(P, P, torch.tensor([0]))) == 0.0  # delta 0: plain greedy


def test_lantern_greedy_relaxes_on_the_demo(demo_gen):
    g = SamplingParams(temperature=0.0, cfg_scale=1.5)
    ar = demo_gen.generate(classes=list(range(10)), method="ar", sampling=g, images=False)
    lan = demo_gen.generate(classes=list(range(10)), method="lantern", method_options={"delta": 0.3, "gamma": 4}, sampling=g,
                              images=False)
    capped = demo_gen.generate(classes=list(range(10)), method="lantern", method_options={"delta": 0.3, "rule": "capped", "gamma": 4},
                               sampling=g, images=False)
    assert np.array_equal(capped.tokens, ar.tokens)  # the capped rule does not relax at temperature 0
    assert not np.array_equal(lan.tokens, ar.tokens)
    assert lan.stats["mean_accepted_length"] > capped.stats["mean_accepted_length"]


# -- latency-aware speculation (issue 19) -------------------------------------------------------------
def _lengths(cost, low=0, high=7, n=2):
    from arexport.runtime.methods.base import RowStats, Slots
    from arexport.runtime.speculative import DraftLength

    slots = Slots(n, 1, "cpu")
    slots.admit(list(range(n)), [None] * n, [RowStats() for _ in range(n)])
    return DraftLength(slots, torch.tensor(cost, dtype=torch.float64), low, high)


def test_draft_length_maximises_expected_tokens_per_second():
    """E(d) / (cost[d] + host), host = cost[0] unless given, with E(d) = (1 - a^(d+1)) / (1 - a): a nearly flat curve and good
    acceptance verify long windows, poor acceptance or a steep curve plain decoding; each image by its
    own acceptance."""
    cap = torch.tensor([99, 99])
    flat = _lengths([1.0 + 0.05 * d for d in range(8)])
    flat.accepted[:2] = torch.tensor([40.0, 0.0])  # image 0 accepts nearly everything, image 1 nothing
    flat.rejected[:2] = torch.tensor([1.0, 40.0])
    assert flat.choose(2, cap).tolist() == [7, 0]
    steep = _lengths([1.0 + 2.0 * d for d in range(8)])  # each draft costs two decode steps
    steep.accepted[:2], steep.rejected[:2] = torch.tensor([40.0, 40.0]), torch.tensor([1.0, 1.0])
    assert steep.choose(2, cap).tolist() == [0, 0]
    a = 0.8  # the formula itself, at one acceptance rate, against a brute-force argmax
    lens = _lengths([1.0 + 0.3 * d for d in range(8)])
    lens.accepted[:2], lens.rejected[:2] = torch.tensor([a * 1000 - 1] * 2), torch.tensor([(1 - a) * 1000 - 1] * 2)
    best = max(range(8), key=lambda d: sum(a ** j for j in range(d + 1)) / (2.0 + 0.3 * d))
    assert lens.choose(2, cap).tolist() == [best, best]
    assert lens.choose(2, torch.tensor([1, 0])).tolist() == [min(best, 1), 0]  # never past what is left


def test_draft_length_learns_and_explores_again():
    lens = _lengths([1.0, 1.4, 1.8, 2.2, 2.6, 3.0, 3.4, 3.8])
    cap, on = torch.tensor([9, 9]), torch.tensor([True, True])
    for _ in range(6):  # image 0 accepts every draft, image 1 none
        d = lens.choose(2, cap)
        lens.observe(d, torch.stack([d[0], torch.zeros((), dtype=torch.long)]), on)
    d = lens.choose(2, cap)
    assert d[0] > 2 and d[1] == 0
    lens.observe(torch.tensor([d[0], 1]), torch.tensor([d[0], 0]), on)  # image 1's last verified draft
    for _ in range(7):  # image 1 sits at d = 0 and sees nothing ...
        lens.observe(torch.tensor([d[0], 0]), torch.tensor([d[0], 0]), on)
    assert lens.choose(2, cap)[1] == 0
    lens.observe(torch.tensor([d[0], 0]), torch.tensor([d[0], 0]), on)
    assert lens.choose(2, cap)[1] == 1  # ... until it tries one draft again after 8 idle steps


def _arms(n=2, reprobe=10, probe=3):
    """WindowArms over n images, priced where the window (16) pays from 1.75 tokens per step on: c(1) = 1,
    c(16) = 2.5, host 1."""
    from arexport.runtime.methods.base import RowStats, Slots
    from arexport.runtime.speculative import WindowArms

    slots = Slots(n, 1, "cpu")
    slots.admit(list(range(n)), [None] * n, [RowStats() for _ in range(n)])
    curve = torch.tensor([1 + 0.1 * q for q in range(16)], dtype=torch.float64)
    return WindowArms(slots, curve, 16, 1.0, reprobe=reprobe, probe=probe), slots


def test_window_arms_pick_the_window_only_where_it_pays():
    """SJD's latency-aware window, per image: the window runs first; L = 1 commits one token per
    step, so it is never run to be measured; the arm with more tokens per unit of price wins; a step
    right after a switch does not count; while L = 1 wins the window is re-measured `probe` steps in
    a row every `reprobe` steps. Each image decides from its own yield alone."""
    arms, _ = _arms()

    def run(steps, yields):  # yields[i]: what image i's window commits per step
        seen = []
        for _ in range(steps):
            a = arms.choose(2)
            seen.append(list(a))
            got = torch.tensor([y if x == 16 else 1.0 for x, y in zip(a, yields)], dtype=torch.float64)
            arms.observe(got, torch.tensor([True, True]))
        return seen

    seen = run(40, [3.0, 1.0])  # image 0: 3 tokens for 3.5 beats 1 for 2; image 1's window does not pay
    assert [s[0] for s in seen] == [16] * 40  # no step is spent measuring L = 1
    assert [s[1] for s in seen[:9]] == [16] * 9  # the first step (cold) and `trust` = 8 counted ones
    assert float(arms.tokens[0]) == pytest.approx(3.0)
    tail = "".join("w" if s[1] == 16 else "." for s in seen[-20:])
    assert "www" in tail and "wwww" not in tail  # image 1: re-measured in bursts of 3 ...
    assert "." * 10 in tail and "." * 11 not in tail  # ... every 10 steps at L = 1
    seen = run(60, [1.0, 3.0])  # the images swap: each follows its own yield
    assert [s[1] for s in seen[-10:]] == [16] * 10
    assert [s[0] for s in seen[-40:]].count(1) > 0.7 * 40
    before = (arms.tokens.clone(), arms.counted.clone())
    arms.choose(2)
    arms.observe(torch.tensor([9.0, 9.0], dtype=torch.float64), torch.tensor([False, False]))  # cut short: not counted
    assert torch.equal(arms.tokens, before[0]) and torch.equal(arms.counted, before[1])


def test_window_arms_read_no_clock_and_no_neighbour():
    """An image's arms depend on its own yields only: the same image with another neighbour (or
    alone) runs the same arms (issue 38: the batch-wide choice made tokens depend on the batch)."""
    alone, _ = _arms(n=1)
    paired, _ = _arms(n=2)
    mine = [3.0, 1.0, 1.0, 1.2, 1.0, 1.0, 2.5, 1.0, 1.0, 1.0] * 6
    a_seen, p_seen = [], []
    for t, y in enumerate(mine):
        a, p = alone.choose(1), paired.choose(2)
        a_seen.append(int(a[0]))
        p_seen.append(int(p[0]))
        alone.observe(torch.tensor([y if a[0] == 16 else 1.0], dtype=torch.float64), torch.tensor([True]))
        other = 16.0 if t % 3 else 1.0  # a neighbour that does something else entirely
        paired.observe(torch.tensor([y if p[0] == 16 else 1.0, other], dtype=torch.float64), torch.tensor([True, t % 2 == 0]))
    assert a_seen == p_seen and 1 in a_seen and 16 in a_seen


@pytest.mark.parametrize("method", ["sjd", "sd"])
def test_lossless_when_the_window_changes_every_step(enum_models, method, monkeypatch):
    """Any window schedule keeps SJD and SD exact: the latency-aware choice is replaced by one that
    cycles through every length, step by step and image by image (issue 19)."""
    from arexport.runtime import speculative

    used = set()
    calls = [0]

    def cycling(self, n, cap):  # sd: per image
        calls[0] += 1
        d = (torch.arange(n) + calls[0]) % (self.high + 1 - self.low) + self.low
        d = torch.minimum(d, cap.clamp(min=0))
        used.update(d.tolist())
        return d

    def cycling_window(self, n):  # sjd: per image and step
        calls[0] += 1
        arm = 1 + (torch.arange(n) + calls[0]) % self.window
        used.update(arm.tolist())
        return arm.tolist()

    monkeypatch.setattr(speculative.DraftLength, "choose", cycling)
    monkeypatch.setattr(speculative.WindowArms, "choose", cycling_window)
    target, draft = enum_models
    gen = Generator(TorchEngine(target), TorchEngine(draft))
    counts, stats = sample_counts(gen, method, CASES[0], N, {}, seed=91)  # default options: latency-aware
    assert chi2_p(counts, exact_distribution(target, 1, CASES[0])) > 1e-3
    assert len(used) >= 3 and stats["mean_accepted_length"] > 1.2


def test_sd_round_where_an_idle_image_sits_next_to_a_first_round(demo_gen, monkeypatch):
    """An image that drafts nothing this round (g = 0) next to images in their first round: the
    draft's catch-up block is as wide as the drafting images need (1 token), and the idle image's
    output row must not be read past it (it was: 'index 1 is out of bounds', seen with latency-aware
    lengths at batch 2)."""
    from arexport.runtime import speculative

    def slot0_idle(self, n, cap):
        d = cap.clamp(min=0).clone()
        d[0] = 0  # slot 0 decodes one token per round; the other slot drafts and turns over images
        return d

    monkeypatch.setattr(speculative.DraftLength, "choose", slot0_idle)
    params = SamplingParams(cfg_scale=1.5)
    out = demo_gen.generate(classes=[0, 1, 2, 3], method="sd", sampling=params, seed=2, batch_size=2, images=False)
    assert out.tokens.shape == (4, 64) and out.stats["draft_forwards"] > 0
