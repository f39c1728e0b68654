"""The per-row random streams after vectorising the row words (issue 35): numpy's uint32 row hash, the
draws built on it and the CPU's draw cache give the bits of the scalar definition, re-implemented here
from rng.py's docstring (lowbias32 over the words seed lo, seed hi, counter, lane, stream, half), on
many seeds (up to 63 bits), counters (past 2**32) and lanes. Controls: a hash without the seed's high
word, and one with the seed's two words swapped, are rejected."""

import numpy as np
import pytest
import torch

from arexport.runtime import rng

M32, GOLDEN = 0xFFFFFFFF, 0x9E3779B9


def mix(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def row_word(seed: int, counter: int, words=lambda s, c: (s & M32, (s >> 32) & M32, c & M32)) -> int:
    h = 0
    for i, w in enumerate(words(seed, counter)):
        h = mix(h ^ ((w + GOLDEN * (i + 1)) & M32))
    return h


def uniform(seed: int, counter: int, lane: int, stream: int, row=row_word) -> float:
    h = row(seed, counter)
    for i, w in ((4, lane), (5, stream)):
        h = mix(h ^ ((w + GOLDEN * i) & M32))
    hi, lo = mix(h ^ ((GOLDEN * 6) & M32)), mix(h ^ ((1 + GOLDEN * 6) & M32))
    return (((hi >> 5) << 26) | (lo >> 6)) / float(1 << 53)


def _pairs(n: int, seed: int):
    g = np.random.default_rng(seed)
    seeds = [int(x) for x in g.integers(0, 2**63 - 1, n, dtype=np.int64)] + [0, 1, 2**32 - 1, 2**32, 2**63 - 1]
    counters = [int(x) for x in g.integers(0, 2**40, n, dtype=np.int64)] + [0, 2**32 - 1, 2**32, 2**32 + 5, 7]
    return seeds, counters


def test_vector_row_words_equal_the_scalar_definition():
    seeds, counters = _pairs(3000, 1)
    got = rng._row_words_np(seeds, counters)
    assert got.dtype == np.uint32
    assert got.tolist() == [row_word(s, c) for s, c in zip(seeds, counters)]
    assert rng._row_words(seeds, counters) == got.tolist()
    assert rng._row_words(seeds[:3], counters[:3]) == got[:3].tolist()  # the Python-int branch


@pytest.mark.parametrize("rows,lanes", [(1, (1,)), (1, (33, 15)), (3, (2, 1, 7)), (40, (16,)), (7, (64, 3))])
def test_draws_equal_the_scalar_definition(rows, lanes):
    seeds, counters = _pairs(rows, rows)
    seeds, counters = seeds[-rows:], counters[-rows:]  # include the edge values
    got = rng._draws_np(seeds, counters, lanes, 3)
    cached = rng.DrawCache(depth=5).draws(seeds, counters, lanes) if max(lanes) <= rng.DrawCache.WIDTH else None
    for i, n in enumerate(lanes):
        want = np.array([[uniform(s, c + i, lane, 3) for lane in range(n)] for s, c in zip(seeds, counters)])
        assert np.array_equal(got[i], want)
        assert torch.equal(rng.draws(torch.tensor(seeds), torch.tensor(counters), lanes, 3)[i], torch.from_numpy(want))
        if cached is not None:  # the cache draws stream 0
            want0 = np.array([[uniform(s, c + i, lane, 0) for lane in range(n)] for s, c in zip(seeds, counters)])
            assert np.array_equal(cached[i].numpy(), want0)


@pytest.mark.parametrize("words", [lambda s, c: (s & M32, 0, c & M32), lambda s, c: ((s >> 32) & M32, s & M32, c & M32)])
def test_controls_are_rejected(words):
    seeds, counters = _pairs(200, 2)
    got = rng._row_words_np(seeds, counters).tolist()
    assert got != [row_word(s, c, words) for s, c in zip(seeds, counters)]
