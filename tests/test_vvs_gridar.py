"""VVS verification skipping and GridAR / best-of-N test-time scaling."""

from __future__ import annotations

import pytest
import torch

from arexport.errors import ArexportError
from arexport.models.registry import load_model
from arexport.runtime.backends.torch.runner import TorchEngine
from arexport.runtime.methods import make_method
from arexport.runtime.methods.gridar import orthogonal_part, replacement_plan
from arexport.families import Conditions
from arexport.runtime.generator import Generator
from arexport.runtime.rng import derive_seeds
from arexport.runtime.sampling import SamplingParams

PARAMS = SamplingParams(cfg_scale=1.5)


@pytest.fixture(scope="module")
def engines():
    return TorchEngine(load_model("demo")), TorchEngine(load_model("demo-draft"))


def _run(engines, method, classes, seeds, params=PARAMS, **opts):
    """Generate with explicit per-image seeds (what the seed of image i is does not matter here)."""
    return Generator(*engines).generate(classes=classes, seeds=seeds, method=method, method_options=opts, sampling=params,
                                        images=False)


def test_vvs_without_skipping_equals_lantern(engines):
    a = _run(engines, "lantern", [0, 3, 5, 9], [1, 2, 3, 4], gamma=4, delta=0.2)
    b = _run(engines, "vvs", [0, 3, 5, 9], [1, 2, 3, 4], gamma=4, delta=0.2, policy="none")
    assert (a.tokens == b.tokens).all()
    assert b.stats["skipped_rounds"] == 0


@pytest.mark.parametrize("policy", ["uniform", "dynamic"])
def test_skipping_saves_target_forwards_and_respects_the_rules(engines, policy):
    calls = []
    for method, opts in (("lantern", {"delta": 0.2}), ("vvs", {"policy": policy})):
        res = _run(engines, method, [2], [7], gamma=4, **opts)
        calls.append(res.stats["target_forwards"])
    decisions = res.rows[0].decisions
    assert res.stats["skipped_rounds"] > 0 and calls[1] < calls[0]
    assert calls[1] == res.rows[0].forwards
    # prefill + every verified round (the last round or two have no drafts left to skip)
    assert 0 <= calls[1] - 1 - sum(not s for _, s in decisions) <= 2
    # skip_verify's new_token leaves out the round's root token: new_token = n_done - 1 (the exact
    # schedule against the official lines: tests/test_official_transcriptions.py)
    assert all(not skipped for n_done, skipped in decisions if n_done - 1 <= 5), "skip_verify: never while new_token <= 5"
    if policy == "dynamic":
        flags = [s for _, s in decisions]
        assert not any(a and b for a, b in zip(flags, flags[1:])), "dynamic never skips twice in a row"
    else:  # the official phase: round idx (from 0, skipped rounds included) with idx % interval == 1
        assert [s for _, s in decisions] == [n_done - 1 > 5 and r % 5 == 1 for r, (n_done, _) in enumerate(decisions)]
    # a skipped round commits the chain's g drafts (the last one is the next root), nothing else
    committed = res.rows[0].accepted
    assert all(k == min(4, 64 - n_done - 1) for (n_done, s), k in zip(decisions, committed) if s)


def test_vvs_quality_stays_close_on_the_demo(engines):
    gen = Generator(*engines)
    from arexport.quality import score_digits

    cls = [i % 10 for i in range(100)]
    # batch 50: every image gets the tokens it gets alone (tests/test_redesign.py checks that)
    res = gen.generate(classes=cls, method="vvs", method_options={"policy": "uniform", "gamma": 4}, sampling=PARAMS, batch_size=50,
                       images=False, seed=3)
    # skipped rounds commit unverified drafts: some accuracy is lost next to lantern (docs/benchmarks.md)
    assert score_digits(res.tokens, cls).accuracy >= 0.8
    assert res.stats["forwards_per_image_alone"] < 15  # lantern alone needs ~16, ar 64


def _official_path_similarity(paths, latents, decay=0.9):
    """compute_similarity_pytorch_jit (exp_decay) for equal-length paths without their root token."""
    z = torch.nn.functional.normalize(latents[paths], dim=-1)  # [N, L, d]
    sims = torch.einsum("nld,mld->lmn", z, z)
    w = decay ** torch.arange(paths.shape[1], dtype=z.dtype)
    final = torch.einsum("l,lnm->nm", w / w.sum(), sims)
    iu = torch.triu_indices(len(paths), len(paths), offset=1)
    return final[iu[0], iu[1]].mean() if iu.shape[1] else torch.tensor(0.0)


def test_candidate_similarity_is_the_official_path_similarity_of_every_second_path():
    from arexport.runtime.methods.vvs import candidate_similarity

    g = torch.Generator().manual_seed(2)
    latents = torch.randn(30, 5, generator=g)
    q = torch.softmax(torch.randn(1, 4, 30, generator=g) * 3, -1)
    for c in (4, 6):
        ranks = q[0].topk(c, dim=-1).indices.T  # path r = the rank-r token at every position
        want = _official_path_similarity(ranks[::2], latents)  # skip_verify down-samples the paths [::2]
        assert float(candidate_similarity(q, latents, c)[0]) == pytest.approx(float(want), abs=1e-6)
    assert float(candidate_similarity(q, latents, 2)[0]) == 0.0  # one path left: never similar enough


def test_bad_vvs_options():
    with pytest.raises(ArexportError, match="vvs policy must be one of"):
        make_method("vvs", policy="sometimes")
    with pytest.raises(ArexportError, match="skip interval must be >= 2"):
        make_method("vvs", skip_interval=1)


def test_replacement_plan():
    f = torch.tensor([True, False, True, False, False, False, False, False, True, True, True, True])
    plan = replacement_plan(f, 4)
    assert plan.tolist() == [0, 0, 2, 2, 4, 5, 6, 7, 8, 9, 10, 11]


def _official_3way(c, u, r, w):
    """GridAR-Janus-Pro decode.py cfg_decode_3_way (one guidance weight w, Janus-Pro's u + (w+1)(c-u) form)."""
    d, e = c - u, r - u
    orth = e - ((e * d).sum(-1, keepdim=True) / (d * d).sum(-1, keepdim=True).clamp_min(1e-12)) * d
    return u + (w + 1.0) * d + w * orth


def test_three_way_cfg_is_the_official_formula_at_the_samplers_scale():
    """Our 3-way guidance = the sampler's CFG at s plus w3 perp(r - u), w3 defaulting to s - 1: with
    s = w + 1 that is the official cfg_decode_3_way with its single weight w."""
    from arexport.runtime.sampling import cfg_combine

    g = torch.Generator().manual_seed(0)
    c, u, r = (torch.randn(3, 11, generator=g) for _ in range(3))
    for w in (0.5, 4.0):
        ours = cfg_combine(c, u, w + 1.0) + w * orthogonal_part(c, u, r)
        assert torch.allclose(ours, _official_3way(c, u, r, w), atol=1e-5)
    d = c - u
    assert torch.allclose(orthogonal_part(c, u, u + 2.0 * d), torch.zeros_like(d), atol=1e-5)  # parallel: nothing left


def _official_propagate(flags, n, grouped_by_4):
    """method_utils.propagate_selection for one prompt: source index of every candidate."""
    src = list(range(n))
    possible = [i for i in range(n) if flags[i]]
    impossible = [i for i in range(n) if not flags[i]]
    if grouped_by_4:
        for base in range(0, n, 4):
            pos = [o for o in range(4) if flags[base + o]]
            imp = [o for o in range(4) if not flags[base + o]]
            if not pos:
                continue
            for k, o in enumerate(imp):
                src[base + o] = base + pos[k % len(pos)]
    elif possible:
        for k, dst in enumerate(impossible):
            src[dst] = possible[k % len(possible)]
    return src


@pytest.mark.parametrize("seed", range(6))
def test_replacement_groups_match_the_official_selection_at_n8(seed):
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(8, generator=g) < 0.4
    f[4:] = False if seed % 2 else f[4:]  # every other case: a whole group of 4 infeasible
    assert replacement_plan(f, 4).tolist() == _official_propagate(f.tolist(), 8, True)
    assert replacement_plan(f, 8).tolist() == _official_propagate(f.tolist(), 8, False)
    if seed % 2 and bool(f[:4].any()):  # the grouped default keeps the infeasible group, pooling copies into it
        assert replacement_plan(f, 4)[4:].tolist() == [4, 5, 6, 7]
        assert replacement_plan(f, 8)[4:].tolist() != [4, 5, 6, 7]


def test_gridar_n8_replaces_within_groups_of_four_by_default(engines):
    def verifier(partial):
        out = torch.zeros(len(partial.tokens), dtype=torch.bool)
        out[0] = True  # only candidate 0 of group 0 is feasible; group 1 has none
        return out

    res = _run(engines[:1], "gridar", [6], [5], candidates=8, verifier=verifier, checkpoints="0.25")
    assert res.stats["gridar_replaced"] == 3  # rows 1-3 copy row 0; rows 4-7 stay
    res = _run(engines[:1], "gridar", [6], [5], candidates=8, verifier=verifier, checkpoints="0.25", group=8)
    assert res.stats["gridar_replaced"] == 7
    with pytest.raises(ArexportError, match="gridar group must divide"):
        make_method("gridar", candidates=8, group=3)


def test_gridar_accepting_everything_is_n_independent_ar_samples(engines):
    seeds = torch.tensor([11, 12])
    res = _run(engines[:1], "gridar", [4, 8], seeds.tolist(), candidates=4, verifier="accept-all")
    cand_seeds = derive_seeds(seeds.repeat_interleave(4), torch.arange(4).repeat(2))
    ar = _run(engines[:1], "ar", [4, 4, 4, 4, 8, 8, 8, 8], cand_seeds.tolist())
    cands = torch.stack([e["candidate_tokens"] for e in res.extras])
    assert torch.equal(cands.view(8, -1), torch.from_numpy(ar.tokens))
    assert res.stats["gridar_replaced"] == 0
    best = [e["best"] for e in res.extras]
    assert (res.tokens == ar.tokens.reshape(2, 4, -1)[[0, 1], best]).all()
    assert best == [int(e["candidate_scores"].argmax()) for e in res.extras]


def test_gridar_pruning_replaces_exactly_the_rejected(engines):
    seen = {}

    def verifier(partial):
        if "tokens" not in seen:
            seen["tokens"] = partial.tokens.clone()
            seen["visible"] = partial.visible.shape
            return torch.tensor([True, False, True, False])
        return torch.ones(4, dtype=torch.bool)

    res = _run(engines[:1], "gridar", [6], [5], candidates=4, verifier=verifier)
    cands = res.extras[0]["candidate_tokens"]
    before, after = seen["tokens"], cands[:, : seen["tokens"].shape[1]]
    assert before.shape[1] == 16  # a quarter of the 8 rows = 2 rows of 8 tokens
    assert seen["visible"][1] == 32  # 2 of 8 pixel blocks of 16 px
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])  # feasible: untouched
    assert torch.equal(after[1], before[0]) and torch.equal(after[3], before[2])  # rejected: copies, round robin
    full = cands
    assert not torch.equal(full[1], full[0]) and not torch.equal(full[3], full[2])  # copies diverge afterwards
    assert res.stats["gridar_replaced"] == 2 and res.stats["gridar_verifier_calls"] == 2


def test_best_of_n_and_cost_accounting(engines):
    gen = Generator(engines[0])
    r = gen.generate(classes=[1, 2], method="best-of-n", method_options={"candidates": 3}, sampling=PARAMS, images=False)
    assert r.stats["candidate_forwards_per_image"] == 3 * 64 and r.stats["target_forwards"] == 64
    r = gen.generate(classes=[1, 2], method="gridar", method_options={"candidates": 8}, sampling=PARAMS, images=False)
    assert r.stats["candidate_forwards_per_image"] == 8 * 64 and r.stats["gridar_verifier_calls"] == 2
    with pytest.raises(ArexportError, match="gridar candidates must be a positive multiple of 4"):
        make_method("gridar", candidates=6)


def test_gridar_needs_a_verifier_for_real_models():
    lm = load_model("llamagen-c2i-B", random_init=True, overrides={"n_layer": 1, "dim": 64, "n_head": 4, "grid_size": 4, "multiple_of": 32})
    with pytest.raises(ArexportError, match="gridar needs a verifier for this model"):
        Generator(TorchEngine(lm)).generate(classes=[1], method="gridar", sampling=PARAMS, images=False)


def test_reformulation_hook_and_three_way_cfg_on_t2i():
    lm = load_model("llamagen-t2i-B", random_init=True, seed=2,
                    overrides={"n_layer": 2, "dim": 64, "n_head": 4, "grid_size": 4, "multiple_of": 32, "cls_token_num": 6, "caption_dim": 32})
    gen = Generator(TorchEngine(lm))
    emb = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0))
    calls = []

    def reformulate(partial, c):
        calls.append(partial.fraction)
        return Conditions(embeds=c.embeds * 0.5, mask=c.mask)

    scorer = lambda images, c: images.float().mean((1, 2, 3))  # noqa: E731

    def run(**opts):
        res = gen.generate(captions=emb, seeds=[9], method="gridar", sampling=SamplingParams(cfg_scale=3.0), images=False,
                           method_options=dict(candidates=4, verifier="accept-all", scorer=scorer, **opts))
        return res.extras[0]["candidate_tokens"]

    base = run()
    same = run(reformulate=reformulate, w3=0.0)
    assert calls == [0.25, 0.5] and torch.equal(base, same)
    cand = run(reformulate=reformulate, w3=2.0)
    first = 4  # tokens before the first checkpoint do not see the reformulation
    assert torch.equal(cand[:, :first], base[:, :first])
    assert not torch.equal(cand, base)
    assert torch.equal(run(reformulate=reformulate), cand)  # w3 defaults to cfg_scale - 1 = 2 (the official weight)


def test_reformulation_sees_the_selected_candidates():
    """The hook gets the partial canvases after replacement: a rejected row shows its replacement's tokens."""
    lm = load_model("llamagen-t2i-B", random_init=True, seed=2,
                    overrides={"n_layer": 2, "dim": 64, "n_head": 4, "grid_size": 4, "multiple_of": 32, "cls_token_num": 6, "caption_dim": 32})
    emb = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0))
    seen = {}

    def verifier(partial):
        seen.setdefault("verified", partial.tokens.clone())
        return torch.tensor([True, False, False, True])

    def reformulate(partial, c):
        seen.setdefault("reformulated", (partial.tokens.clone(), partial.canvas.clone()))
        return Conditions(embeds=c.embeds * 0.5, mask=c.mask)

    Generator(TorchEngine(lm)).generate(
        captions=emb, seeds=[9], method="gridar", sampling=SamplingParams(cfg_scale=3.0), images=False,
        method_options=dict(candidates=4, verifier=verifier, scorer=lambda images, c: images.float().mean((1, 2, 3)),
                            reformulate=reformulate, checkpoints="0.25"))
    v, (r, canvas) = seen["verified"], seen["reformulated"]
    assert torch.equal(r, v[[0, 0, 3, 3]])  # rows 1 and 2 were replaced by 0 and 3, round robin
    assert torch.equal(canvas[1], canvas[0]) and torch.equal(canvas[2], canvas[3])


def test_digit_scorer_tells_confident_candidates_apart():
    """Two candidates whose float32 class probability both round to 1.0 still get ordered scores
    (float64), so GridAR's pick does not rest on the CPU's last rounding bit."""
    from arexport.quality import judge
    from arexport.runtime.verifiers import DigitScorer, _digit_input

    gen = Generator.load("demo")
    out = gen.generate(classes=[0] * 16, seed=3, images=True, timings=False)
    imgs = torch.from_numpy(out.images)
    with torch.no_grad():
        logits = judge("cnn")(_digit_input(imgs))
    p32 = torch.softmax(logits, -1)[:, 0]
    margin = logits[:, 0] - logits[:, 1:].max(-1).values
    sat = torch.nonzero(p32 == 1.0).flatten()
    assert len(sat) >= 2, "the demo should make several float32-saturated zeros"
    scores = DigitScorer()(imgs[sat], Conditions(classes=torch.zeros(len(sat), dtype=torch.long)))
    assert scores.dtype == torch.float64 and len(set(scores.tolist())) > 1
    assert int(scores.argmax()) == int(margin[sat].argmax())  # the most confident candidate wins
