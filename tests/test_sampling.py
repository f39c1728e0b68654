"""Sampling honours temperature/top-k/top-p/CFG, and the per-row RNG is uniform and batch-invariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from arexport.errors import ArexportError
from arexport.runtime.rng import RowRNG, image_seed, uniforms
from arexport.runtime.sampling import (SamplingParams, cfg_combine, cfg_scales, filter_logits, guided_logits, probs_from_logits,
                                       sample_from_probs, sample_logits)


def _draw(logits, params, n=40000, seed=0):
    rng = RowRNG(torch.arange(n) + seed * 1_000_003)
    u = rng.uniform(1)[:, 0]
    return sample_logits(logits.expand(n, -1), params, u).numpy()


def _chi2_p(samples, probs):
    probs = np.asarray(probs, dtype=np.float64)
    support = probs > 0
    counts = np.bincount(samples, minlength=len(probs))
    assert counts[~support].sum() == 0, "sampled a token with zero probability"
    exp = probs[support] / probs[support].sum() * len(samples)
    return chisquare(counts[support], exp).pvalue


def test_uniforms_are_uniform_and_independent_of_batch():
    seeds = torch.arange(500) * 7919
    u = uniforms(seeds, torch.zeros(500, dtype=torch.long), 40).numpy().ravel()
    counts, _ = np.histogram(u, bins=50, range=(0, 1))
    assert chisquare(counts).pvalue > 1e-3
    # The same seed gives the same stream whatever else shares the batch.
    a = RowRNG(torch.tensor([11, 22, 33]))
    b = RowRNG(torch.tensor([22]))
    for _ in range(3):
        ua, ub = a.uniform(4), b.uniform(4)
        assert torch.equal(ua[1], ub[0])
    assert image_seed(5, 3) == image_seed(5, 3) != image_seed(5, 4)


def test_plain_sampling_matches_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    p = torch.softmax(logits, -1)[0]
    s = _draw(logits, SamplingParams())
    assert _chi2_p(s, p) > 1e-3


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature(temperature):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    p = torch.softmax(logits / temperature, -1)[0]
    s = _draw(logits, SamplingParams(temperature=temperature), seed=1)
    assert _chi2_p(s, p) > 1e-3
    # And the wrong temperature is detected by the same test.
    wrong = torch.softmax(logits, -1)[0]
    assert _chi2_p(s, wrong) < 1e-6


def test_top_k_keeps_k_and_ties():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    f = filter_logits(logits, top_k=2)
    assert torch.isfinite(f).sum() == 3  # 3.0 and the tied 2.0s
    f = filter_logits(torch.tensor([[3.0, 1.0, 2.5, 2.0, 0.0]]), top_k=2)
    assert torch.isfinite(f)[0].tolist() == [True, False, True, False, False]
    s = _draw(torch.tensor([[3.0, 1.0, 2.5, 2.0, 0.0]]), SamplingParams(top_k=2), seed=2)
    p = torch.softmax(torch.tensor([3.0, 2.5]), -1)
    assert _chi2_p(s, [p[0], 0, p[1], 0, 0]) > 1e-3


def test_kth_largest_equals_topk_with_ties():
    """The CPU partition path gives torch.topk's k-th value exactly, ties and -inf included."""
    from arexport.runtime.sampling import kth_largest

    g = torch.Generator().manual_seed(0)
    for shape in [(3, 17), (2, 16, 1000), (7,)]:
        x = torch.randint(-4, 4, shape, generator=g).float()
        x.view(-1)[::5] = float("-inf")
        for k in (1, 2, 5, shape[-1]):
            assert torch.equal(kth_largest(x, k), torch.topk(x, k, dim=-1).values[..., -1:]), (shape, k)
            assert torch.equal(kth_largest(x.double(), k), torch.topk(x.double(), k, dim=-1).values[..., -1:])


def test_non_finite_guard_is_exact():
    """NaN or one infinity is caught; huge finite logits whose float32 sum overflows are not refused."""
    from arexport.runtime.engine import StepEngine

    class E:
        backend, calls = "torch", {"decode": 1}

    x = torch.zeros(2, 3, 5)
    assert StepEngine._finite(E(), x, "decode") is x
    big = torch.full((2, 3, 5), 3e38)
    assert StepEngine._finite(E(), big, "decode") is big  # sum overflows, every entry is finite
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1, 2, 4] = bad
        with pytest.raises(ArexportError, match="non-finite logits .* row 1"):
            StepEngine._finite(E(), y, "decode")
    y = big.clone()
    y[0, 0, 0] = float("-inf")  # inf + -inf sums to NaN: still caught, by the entry-wise test
    with pytest.raises(ArexportError, match="row 0"):
        StepEngine._finite(E(), y, "decode")


def test_top_p_keeps_the_token_crossing_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_p=0.45)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.6)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.85)).tolist() == [[True, True, True, False]]
    s = _draw(logits, SamplingParams(top_p=0.6), seed=3)
    assert _chi2_p(s, [0.5 / 0.8, 0.3 / 0.8, 0, 0]) > 1e-3


def test_greedy_and_one_hot_probs():
    logits = torch.tensor([[0.1, 5.0, 0.2], [3.0, 0.0, 1.0]])
    params = SamplingParams(temperature=0.0)
    assert sample_logits(logits, params, torch.rand(2)).tolist() == [1, 0]
    assert probs_from_logits(logits, params).tolist() == [[0, 1, 0], [1, 0, 0]]


def test_cfg_combine_and_interval():
    cond = torch.tensor([[1.0, 2.0]])
    uncond = torch.tensor([[0.5, 0.0]])
    assert torch.allclose(cfg_combine(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    p = SamplingParams(cfg_scale=3.0, cfg_interval=2)
    assert p.cfg_active(0) and p.cfg_active(3) and not p.cfg_active(4)
    assert torch.equal(guided_logits(cond, uncond, p, 4, 16), cond)
    assert torch.equal(guided_logits(cond, uncond, p, torch.tensor([3]), 16), cfg_combine(cond, uncond, 3.0))
    assert torch.equal(guided_logits(cond, uncond, p, torch.tensor([4]), 16), cond)
    assert not SamplingParams(cfg_scale=1.0).uses_cfg


def _rar_official_scale(g, p, step, n):
    """Transcribed from RAR's generate (1d-tokenizer modeling/rar.py): torch ops in its order."""
    scale_pow = torch.ones((1,)) * p
    scale_step = (1 - torch.cos(((step / n) ** scale_pow) * torch.pi)) * 1 / 2
    return float((g - 1) * scale_step + 1)


@pytest.mark.parametrize("g,p", [(16.0, 2.75), (15.5, 2.5), (6.9, 1.5), (8.0, 1.2), (4.0, 0.0), (3.0, 1.0)])
def test_cosine_schedule_is_rars_formula(g, p):
    """Every token index of a 256-token image gets RAR's scale (the per-size defaults, and p = 0 = constant)."""
    params = SamplingParams(cfg_scale=g, cfg_schedule="cosine", cfg_power=p)
    got = cfg_scales(params, torch.arange(256), 256)
    want = torch.tensor([_rar_official_scale(g, p, t, 256) for t in range(256)])
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert cfg_scales(params, 0, 256) == pytest.approx(1.0 if p > 0 else g)
    assert cfg_scales(params, 255, 256) == pytest.approx(want[-1].item(), rel=1e-6)
    if p > 0:
        assert bool((got[1:] >= got[:-1]).all())  # a ramp from 1 towards g


def test_linear_and_constant_schedules_and_their_guided_logits():
    lin = SamplingParams(cfg_scale=4.0, cfg_schedule="linear")
    assert cfg_scales(lin, torch.tensor([0, 63, 127]), 128).tolist() == pytest.approx([1 + 3 / 128, 1 + 3 * 64 / 128, 4.0])
    assert cfg_scales(SamplingParams(cfg_scale=4.0), torch.tensor([0, 5]), 16) == 4.0
    cond, uncond = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    idx = torch.arange(15).view(3, 5)
    cos = SamplingParams(cfg_scale=9.0, cfg_schedule="cosine", cfg_power=2.0)
    got = guided_logits(cond, uncond, cos, idx, 15)
    for b in range(3):
        for t in range(5):
            s = _rar_official_scale(9.0, 2.0, int(idx[b, t]), 15)
            assert torch.allclose(got[b, t], uncond[b, t] + (cond[b, t] - uncond[b, t]) * s, atol=1e-5)
    with pytest.raises(ArexportError, match="cfg-schedule"):
        SamplingParams(cfg_schedule="cos").validate(16)
    with pytest.raises(ArexportError, match="cfg-power"):
        SamplingParams(cfg_power=float("nan")).validate(16)


def test_inverse_cdf_edges():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(4, -1)
    u = torch.tensor([0.0, 0.4999, 0.5, 1.0 - 2**-53], dtype=torch.float64)
    assert sample_from_probs(probs, u).tolist() == [1, 1, 3, 3]


def test_uniforms_numpy_and_device_paths_give_the_same_bits():
    """The CPU (numpy, and Python ints for a few draws) and device (torch int64) hash paths are one
    function: equal bits, including 63-bit seeds, large counters and other streams."""
    from arexport.runtime.rng import _uniforms_np, _uniforms_torch

    g = torch.Generator().manual_seed(5)
    seeds = torch.randint(0, 2**62, (64,), generator=g)
    counters = torch.randint(0, 2**40, (64,), generator=g)
    for rows, lanes, stream in ((64, 1, 0), (64, 33, 0), (64, 7, 3), (1, 1, 0), (2, 1, 2), (2, 4, 0), (1, 8, 1)):
        a = torch.from_numpy(_uniforms_np(seeds[:rows].numpy(), counters[:rows].numpy(), lanes, stream))
        assert a.shape == (rows, lanes) and a.dtype == torch.float64
        assert torch.equal(a, _uniforms_torch(seeds[:rows], counters[:rows], lanes, stream))
        assert torch.equal(a, uniforms(seeds[:rows], counters[:rows], lanes, stream))


def test_draws_are_consecutive_uniforms_on_both_paths():
    """`draws` hashes several draws of different widths in one pass: draw i equals `uniforms` at
    counter + i, on the numpy path (flat and Python-int branches) and the device path."""
    from arexport.runtime.rng import _draws_np, _uniforms_torch, draws

    g = torch.Generator().manual_seed(6)
    seeds = torch.randint(0, 2**62, (5,), generator=g)
    counters = torch.randint(0, 2**40, (5,), generator=g)
    for rows, lanes in ((1, (33, 15)), (5, (2, 1, 7)), (1, (1, 1)), (2, (3,))):
        s, c = seeds[:rows], counters[:rows]
        got = draws(s, c, lanes, 1)
        flat = _draws_np(s.tolist(), c.tolist(), lanes, 1)
        for i, n in enumerate(lanes):
            want = _uniforms_torch(s, c + i, n, 1)
            assert got[i].shape == (rows, n) and torch.equal(got[i], want)
            assert torch.equal(torch.from_numpy(flat[i]), want)


def test_draw_cache_serves_the_same_bits_as_hashing():
    """The CPU's prefetched draws equal direct hashing across block refills, a wider draw than the
    block holds, counters that jump back, and eviction of least recently used seeds."""
    from arexport.runtime.rng import DrawCache, draws

    cache = DrawCache(depth=4, max_streams=2)
    seeds, counters = [3, 2**61 + 7], [0, 10]
    for step, lanes in enumerate([(5,), (5, 2), (9, 1), (3,), (70 // 2, 4), (1,), (5, 5)]):
        got = cache.draws(seeds, counters, lanes)
        want = draws(torch.tensor(seeds), torch.tensor(counters), lanes)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), step
        counters = [c + len(lanes) for c in counters]
        if step == 3:
            counters[0] = 1  # a counter that moves back is hashed again, not served stale
            seeds.append(99)  # a third seed evicts the least recently used one
            counters.append(0)
    assert len(cache._blocks) == 2
    got = cache.draws([3], [1], (2,))[0]
    got.fill_(0.0)  # callers get copies: the cached block is not written through them
    assert torch.equal(cache.draws([3], [1], (2,))[0], draws(torch.tensor([3]), torch.tensor([1]), (2,))[0])
