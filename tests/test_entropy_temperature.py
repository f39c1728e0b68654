"""Entropy-aware sampling: the per-token temperature equals ARsample's formula, per row.

The reference is re-derived, in this file's own code, from krennic999/ARsample at commit
2923353b75473030c0525594dfba6fd3084d9300, LlamaGen/autoregressive/models/generate.py:
lines 20-58 (top-k then top-p filtering of the guided logits, -inf for removed tokens), lines 61-69
(entropy: sort descending, softmax, sum of -p log(p + 1e-12)) and lines 89-103 (`sample` with
entropy filtering: filter first, temperature * (2.5 exp(-H / 3) + 0.6), softmax).
"""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from arexport.runtime.sampling import SamplingParams, probs_from_logits


def official_probs(logits, temperature, top_k, top_p, a=2.5, b=3.0, c=0.6):
    logits = logits.clone()
    if top_k > 0:
        logits[logits < torch.topk(logits, top_k)[0][..., -1, None]] = -math.inf
    if top_p < 1.0:
        srt, idx = torch.sort(logits, descending=True)
        remove = torch.cumsum(torch.softmax(srt, -1), -1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[remove.scatter(1, idx, remove)] = -math.inf
    sp = torch.softmax(torch.sort(logits, descending=True)[0], -1)
    h = (-sp * torch.log(sp + 1e-12)).sum(-1, keepdim=True)
    return torch.softmax(logits / (temperature * (a * torch.exp(-h / b) + c)), -1)


def logits_case(seed, b=12, v=301):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.1, 6.0, b)[:, None]  # flat to peaked: entropies from ~log V down to ~0
    return torch.randn(b, v, generator=g) * scale


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 40, 1.0), (1.0, 0, 0.9), (1.3, 100, 0.8)])
def test_probs_equal_official(temperature, top_k, top_p):
    for seed in range(2):
        x = logits_case(seed)
        got = probs_from_logits(x, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, entropy_temperature=True))
        ref = official_probs(x, temperature, top_k, top_p)
        assert (got - ref).abs().max() < 1e-5
        # a negative control: exp(-H / 2) instead of exp(-H / 3) is rejected
        assert (got - official_probs(x, temperature, top_k, top_p, b=2.0)).abs().max() > 1e-3
        # and it is not the plain sampler
        plain = probs_from_logits(x, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
        assert (got - plain).abs().max() > 1e-3


def test_per_row_in_one_batch(demo):
    """Images with and without entropy-aware temperature share a batch and keep their own tokens."""
    from arexport.runtime.backends.torch.runner import TorchEngine
    from arexport.runtime.generator import Generator
    from arexport.runtime.methods.base import Row
    from arexport.families import Conditions

    gen = Generator(TorchEngine(demo))
    on, off = SamplingParams(cfg_scale=1.5, entropy_temperature=True), SamplingParams(cfg_scale=1.5)
    alone_on = gen.generate(classes=[3, 5], method="ar", sampling=on, seed=2, images=False, timings=False).tokens
    alone_off = gen.generate(classes=[3, 5], method="ar", sampling=off, seed=2, images=False, timings=False).tokens
    assert not (alone_on == alone_off).all()
    from arexport.runtime.methods import make_method
    from arexport.runtime.methods.base import Context

    dec = make_method("ar").decoder(Context(gen.engine, off, make_method("ar").options), 4)
    from arexport.runtime.rng import image_seed

    seeds = [image_seed(2, 0), image_seed(2, 1)]  # what generate(seed=2) gives images 0 and 1
    rows = [Row(Conditions(classes=torch.tensor([c])), s, tag=i, sampling=p)
            for i, (c, s, p) in enumerate([(3, seeds[0], on), (3, seeds[0], off), (5, seeds[1], off), (5, seeds[1], on)])]
    dec.admit(rows)
    got = {}
    while len(got) < 4:
        for f in dec.step():
            got[f.tag] = f.tokens.cpu().numpy()
    assert (got[0] == alone_on[0]).all() and (got[1] == alone_off[0]).all()
    assert (got[2] == alone_off[1]).all() and (got[3] == alone_on[1]).all()


def test_http_field(demo):
    """`entropy_temperature` over HTTP (POST /generate and /v1/images/generations share the field):
    true gives the tokens of SamplingParams(entropy_temperature=True), absent the model's default;
    a value that is not a JSON boolean is a 422 naming the field."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from arexport.runtime.backends.torch.runner import TorchEngine
    from arexport.runtime.generator import Generator
    from arexport.serving.http import create_app
    from arexport.serving.server import BackgroundServer
    from arexport.serving.service import GenerationService

    gen = Generator(TorchEngine(demo))
    base = gen.sampling_params()
    alone = {on: gen.generate(classes=[3, 8], method="ar", sampling=dict(entropy_temperature=on), seed=4, images=False,
                              timings=False).tokens for on in (True, False)}
    assert not (alone[True] == alone[False]).all()
    svc = GenerationService(gen, batching="continuous", max_batch=4)
    try:
        with BackgroundServer(create_app(svc, max_images=4)) as url:
            def post(**extra):
                return httpx.post(f"{url}/generate", json={"classes": [3, 8], "seed": 4, "format": "tokens", **extra},
                                  timeout=120)

            for extra, want in (({"entropy_temperature": True}, True), ({}, base.entropy_temperature),
                                ({"entropy_temperature": False}, False)):
                r = post(**extra)
                assert r.status_code == 200, r.text
                assert (np.array(r.json()["tokens"]) == alone[want]).all(), extra
            for bad in ("yes", 1, [True]):
                r = post(entropy_temperature=bad)
                assert r.status_code == 422 and "entropy_temperature" in r.json()["error"], (bad, r.text)
    finally:
        svc.close()


def tempered_distribution(lm, params: SamplingParams) -> np.ndarray:
    """P(sequence) of all 3^4 sequences of the enumerable model (class 1) when every token is drawn
    from the entropy-tempered conditional: guided logits, top-k/top-p filtered, divided by
    temperature * (2.5 exp(-H / 3) + 0.6) with H the entropy of the filtered softmax (this file's
    own derivation of ARsample's `sample`, as in official_probs above)."""
    import itertools

    from arexport.runtime.sampling import filter_logits

    seqs = torch.tensor(list(itertools.product(range(3), repeat=4)))
    n = len(seqs)
    with torch.no_grad():
        lc = lm.model(torch.full((n,), 1), seqs)
        if params.uses_cfg:
            lu = lm.model(torch.full((n,), 2), seqs)  # the null class
            lc = lu + params.cfg_scale * (lc - lu)
        lc = filter_logits(lc, params.top_k, params.top_p)
        p = torch.softmax(lc, -1)
        h = -(p * torch.log(p + 1e-12)).sum(-1, keepdim=True)
        logp = torch.log_softmax(lc / (params.temperature * (2.5 * torch.exp(-h / 3) + 0.6)), -1)
        logp = logp.gather(-1, seqs[..., None])[..., 0].sum(-1)
    return logp.exp().double().numpy()


def test_sjd_is_lossless_for_the_tempered_target():
    """sjd with entropy-aware temperature samples the tempered target's sequence distribution
    (chi-square over all 81 sequences, CFG 2); the untempered target is rejected (negative control)."""
    from tests.test_speculative import _tiny, chi2_p, exact_distribution, sample_counts
    from arexport.runtime.backends.torch.runner import TorchEngine
    from arexport.runtime.generator import Generator

    lm = _tiny(11)
    params = SamplingParams(cfg_scale=2.0, entropy_temperature=True)
    counts, _ = sample_counts(Generator(TorchEngine(lm)), "sjd", params, 4000, {"window": 3})
    assert chi2_p(counts, tempered_distribution(lm, params)) > 1e-3
    assert chi2_p(counts, exact_distribution(lm, 1, SamplingParams(cfg_scale=2.0))) < 1e-6
