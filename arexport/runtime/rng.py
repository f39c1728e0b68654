"""Counter-based random numbers, one independent stream per batch row, computed on device.

Each row has a 63-bit seed and a draw counter. A draw hashes (seed, counter, lane) with a
32-bit integer mixer (two rounds of the lowbias32 finaliser over several words) into 53-bit uniforms,
so a row's numbers depend only on its own seed and how many draws it has made: the same request
gives the same image whatever it is batched with, on any device, with no host round trip.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

_M32 = 0xFFFFFFFF


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 32-bit x without int64 overflow (products stay below 2**48)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 finaliser on int64 tensors holding 32-bit values."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mulmod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mulmod32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _hash_words(*words: torch.Tensor) -> torch.Tensor:
    h = torch.zeros_like(words[0])
    for i, w in enumerate(words):
        h = _mix32(h ^ ((w & _M32) + _GOLDEN * (i + 1)))
    return h


def uniforms(seeds: torch.Tensor, counters: torch.Tensor, n_lanes: int, stream: int = 0) -> torch.Tensor:
    """Uniform float64 in [0, 1): [B, n_lanes] from per-row seeds [B] and counters [B] (int64).

    Each uniform hashes the words (seed lo, seed hi, counter, lane, stream, half) for half 0 and 1
    (27 and 26 bits). The first five words are hashed once and shared by both halves, and the
    per-row words once per row, which is the same function with half the work. On the CPU the
    hash runs in numpy's unsigned arithmetic (a per-step cost the runtime pays once per draw);
    elsewhere it stays on the device. Both give the same bits (tests compare them)."""
    return draws(seeds, counters, (n_lanes,), stream)[0]


def draws(seeds: torch.Tensor, counters: torch.Tensor, lanes: Sequence[int], stream: int = 0) -> list[torch.Tensor]:
    """Consecutive draws of every row in one call: the i-th is `uniforms(seeds, counters + i,
    lanes[i], stream)` ([B, lanes[i]]). On the CPU all of them are hashed in one flat numpy pass."""
    if seeds.device.type == "cpu":
        return [torch.from_numpy(a) for a in _draws_np(seeds.tolist(), counters.tolist(), lanes, stream)]
    k, width = len(lanes), max(lanes)
    steps = torch.arange(k, device=seeds.device, dtype=torch.int64)[:, None]
    u = _uniforms_torch(seeds.repeat(k), (counters[None, :] + steps).reshape(-1), width, stream).view(k, -1, width)
    return [u[i, :, :n] for i, n in enumerate(lanes)]


def _uniforms_torch(seeds: torch.Tensor, counters: torch.Tensor, n_lanes: int, stream: int) -> torch.Tensor:
    """`uniforms` in torch int64 ops on the tensors' device (no host round trip)."""
    dev = seeds.device
    lanes = torch.arange(n_lanes, device=dev, dtype=torch.int64).unsqueeze(0)
    h = torch.zeros_like(seeds).unsqueeze(1)
    for i, w in enumerate((seeds & _M32, (seeds >> 32) & _M32, counters)):  # per row [B, 1]
        h = _mix32(h ^ (w.unsqueeze(1) + _GOLDEN * (i + 1)))
    h = _mix32(h ^ (lanes + _GOLDEN * 4))  # [B, n_lanes]
    h = _mix32(h ^ (stream + _GOLDEN * 5))
    hi = _mix32(h ^ (_GOLDEN * 6))
    lo = _mix32(h ^ (1 + _GOLDEN * 6))
    bits53 = ((hi >> 5) << 26) | (lo >> 6)  # 27 + 26 bits
    return bits53.to(torch.float64) * (1.0 / (1 << 53))


_GOLDEN = 0x9E3779B9


_S16, _S15 = np.uint32(16), np.uint32(15)
_C1, _C2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)


def _mix32_np(x: np.ndarray) -> np.ndarray:
    """lowbias32 in place on a uint32 array (its products wrap mod 2**32, as the hash wants)."""
    x ^= x >> _S16
    x *= _C1
    x ^= x >> _S15
    x *= _C2
    x ^= x >> _S16
    return x


def _mix32_int(x: int) -> int:
    """lowbias32 on a Python int (exact: Python ints do not overflow)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


_SMALL = 8  # at most this many uniforms per call are hashed with Python ints


def _finish_int(h: int, lane: int, stream: int) -> float:
    """The lane, stream and half words of one uniform after the per-row words (`_uniforms_np`)."""
    h = _mix32_int(h ^ ((lane + _GOLDEN * 4) & _M32))
    h = _mix32_int(h ^ ((stream + _GOLDEN * 5) & _M32))
    hi = _mix32_int(h ^ ((_GOLDEN * 6) & _M32))
    lo = _mix32_int(h ^ ((1 + _GOLDEN * 6) & _M32))
    return (((hi >> 5) << 26) | (lo >> 6)) * (1.0 / (1 << 53))


def _row_word(seed: int, counter: int) -> int:
    """The hash after a row's words (seed lo, seed hi, counter), in Python ints."""
    h = 0
    for i, w in enumerate((seed & _M32, (seed >> 32) & _M32, counter & _M32)):
        h = _mix32_int(h ^ ((w + _GOLDEN * (i + 1)) & _M32))
    return h


_ROW_SALTS = tuple(np.uint32(_GOLDEN * (i + 1) & _M32) for i in range(3))


def _row_words_np(seeds: Sequence[int], counters: Sequence[int]) -> np.ndarray:
    """`_row_word` of every (seed, counter) pair at once, as uint32 [N]: the same three words through
    the same mixer in numpy's wrapping uint32 arithmetic (w + salt mod 2**32 is `(w + salt) & _M32`).
    Seeds are 63-bit and counters non-negative int64, so both fit int64 before their words are split."""
    s = np.asarray(seeds, dtype=np.int64)
    c = np.asarray(counters, dtype=np.int64)
    h = np.zeros(s.shape, dtype=np.uint32)
    for w, salt in zip(((s & _M32).astype(np.uint32), ((s >> 32) & _M32).astype(np.uint32),
                        (c & _M32).astype(np.uint32)), _ROW_SALTS):
        h ^= w + salt
        _mix32_np(h)
    return h


_ROWS_NP = 16  # from this many row words on, numpy hashes them (below, Python ints are cheaper per call)


def _row_words(seeds: Sequence[int], counters: Sequence[int]) -> list[int]:
    """`_row_word` of each pair, in whichever of the two equal forms is cheaper for this many."""
    if len(seeds) >= _ROWS_NP:
        return _row_words_np(seeds, counters).tolist()
    return [_row_word(seed, counter) for seed, counter in zip(seeds, counters)]


def _words32(start: int, n: int) -> np.ndarray:
    """start, start + 1, ... (n words) mod 2**32 as uint32."""
    return (np.arange(start, start + n, dtype=np.uint64) & np.uint64(_M32)).astype(np.uint32)


_LANE_WORDS = _words32(_GOLDEN * 4, 64)
_HALVES = _words32(_GOLDEN * 6, 2)[:, None]


def _lane_words(n: int) -> np.ndarray:
    global _LANE_WORDS
    if n > _LANE_WORDS.shape[0]:
        _LANE_WORDS = _words32(_GOLDEN * 4, max(n, 2 * _LANE_WORDS.shape[0]))
    return _LANE_WORDS[:n]


def _draws_np(seeds: list[int], counters: list[int], lanes: Sequence[int], stream: int) -> list[np.ndarray]:
    """`draws` in numpy: the same words, the same mixer, the same bits. The per-row words are hashed
    by `_row_words` (Python ints for a handful of rows, where numpy's per-call cost is larger; numpy from
    _ROWS_NP on), then every draw's lanes in one flat array."""
    b = len(seeds)
    flat = _row_words(list(seeds) * len(lanes), [c + i for i in range(len(lanes)) for c in counters])
    rows = [flat[i * b:(i + 1) * b] for i in range(len(lanes))]
    if b * sum(lanes) <= _SMALL:  # a decode step's few draws: Python ints beat numpy's per-call cost
        return [np.array([[_finish_int(h, lane, stream) for lane in range(n)] for h in hs], dtype=np.float64).reshape(b, n)
                for hs, n in zip(rows, lanes)]
    blocks = [(np.array(hs, dtype=np.uint32)[:, None] ^ _lane_words(n)[None, :]).ravel() for hs, n in zip(rows, lanes)]
    flat = _finish_np(blocks[0] if len(blocks) == 1 else np.concatenate(blocks), stream)
    out, at = [], 0
    for n in lanes:
        out.append(flat[at:at + b * n].reshape(b, n))
        at += b * n
    return out


def _finish_np(h: np.ndarray, stream: int) -> np.ndarray:
    """The lane, stream and half words on uint32 hashes h (row words ^ lane words, any shape):
    float64 uniforms shaped like h."""
    h = _mix32_np(h)
    h ^= np.uint32((stream + _GOLDEN * 5) & _M32)
    halves = _mix32_np(_mix32_np(h)[None] ^ _HALVES.reshape(2, *([1] * h.ndim)))
    hi, lo = halves >> np.array([5, 6], dtype=np.uint32).reshape(2, *([1] * h.ndim))  # 27 and 26 bits
    out = hi * float(1 << 26) + lo  # exact in float64 (53 bits)
    out *= 1.0 / (1 << 53)
    return out


class DrawCache:
    """Uniforms prefetched per stream, for the CPU: the next `depth` draws of a seed are hashed in
    one numpy call and served a row at a time, so a step's few draws cost a lookup, not a hash each
    (numpy's per-call cost, paid again after every engine call has evicted it from the CPU caches,
    was a tenth of a small model's SJD step). Same bits as `draws`; at most `max_streams` seeds are
    kept (least recently used go first). Draws wider than WIDTH lanes are not cached. Stream 0
    (the one `Slots` draws from)."""

    WIDTH = 64

    def __init__(self, depth: int = 32, max_streams: int = 1024):
        self.depth, self.max_streams = depth, max_streams
        self._blocks: OrderedDict[int, tuple[int, torch.Tensor]] = OrderedDict()

    def draws(self, seeds: list[int], counters: list[int], lanes: Sequence[int]) -> list[torch.Tensor]:
        """`draws` for these rows: [B, lanes[i]] for draw i (counters + i), as new tensors. (Served
        through numpy instead, sjd's step was ~2% cheaper but ar's ~2% dearer in the same runs.)"""
        return [torch.stack([self._row(sd, c + i, n) for sd, c in zip(seeds, counters)]) for i, n in enumerate(lanes)]

    def _row(self, seed: int, counter: int, width: int) -> torch.Tensor:
        entry = self._blocks.get(seed)
        if entry is None or not entry[0] <= counter < entry[0] + self.depth or entry[1].shape[1] < width:
            wide = max(width, entry[1].shape[1] if entry is not None else 0)
            words = _row_words_np([seed] * self.depth, range(counter, counter + self.depth))
            entry = (counter, torch.from_numpy(_finish_np(words[:, None] ^ _lane_words(wide)[None, :], 0)))
            self._blocks[seed] = entry
            if len(self._blocks) > self.max_streams:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(seed)
        return entry[1][counter - entry[0], :width]


def _uniforms_np(seeds: np.ndarray, counters: np.ndarray, n_lanes: int, stream: int) -> np.ndarray:
    """`uniforms` in numpy (one draw)."""
    return _draws_np(seeds.tolist(), counters.tolist(), (n_lanes,), stream)[0]


class RowRNG:
    """Per-row random streams for a batch: `uniform(n)` -> [B, n] and advances every row by one."""

    def __init__(self, seeds: torch.Tensor):
        self.seeds = seeds.to(torch.int64)
        self.counters = torch.zeros_like(self.seeds)

    @classmethod
    def from_seeds(cls, seeds, device) -> "RowRNG":
        return cls(torch.as_tensor(list(seeds), dtype=torch.int64, device=device))

    def uniform(self, n_lanes: int = 1) -> torch.Tensor:
        u = uniforms(self.seeds, self.counters, n_lanes)
        self.counters += 1
        return u

    def select_rows(self, rows: torch.Tensor) -> None:
        """Replace every row's stream by the stream of the row it is mapped to (rows [B] int64),
        like KVCache.select_rows for copied candidates."""
        rows = rows.to(self.seeds.device)
        self.seeds = self.seeds[rows]
        self.counters = self.counters[rows]

    def reseed(self, rows: torch.Tensor, salt: int) -> None:
        """Give the rows in the bool mask `rows` new streams derived from their seeds and `salt`
        (copied candidates must not replay the stream of the row they were copied from)."""
        self.seeds = torch.where(rows, derive_seeds(self.seeds, salt), self.seeds)


def derive_seeds(seeds: torch.Tensor, salt) -> torch.Tensor:
    """[B] int64 seeds -> [B] new 62-bit seeds, a fixed function of (seed, salt); salt int or [B]."""
    salt = torch.as_tensor(salt, dtype=torch.int64, device=seeds.device).expand_as(seeds)
    return _seed62(seeds & _M32, (seeds >> 32) & _M32, salt, tags=(13, 17))


def image_seed(request_seed: int, index: int) -> int:
    """Seed of the index-th image of a request: a fixed function of both, independent of batching."""
    a = torch.tensor([request_seed & _M32], dtype=torch.int64)
    b = torch.tensor([(request_seed >> 32) & _M32], dtype=torch.int64)
    return int(_seed62(a, b, torch.tensor([index], dtype=torch.int64), tags=(7, 11)).item())


def _seed62(lo: torch.Tensor, hi: torch.Tensor, salt: torch.Tensor, tags: tuple[int, int]) -> torch.Tensor:
    """A 62-bit seed (fits int64 with room to spare) hashed from a seed's two 32-bit words and a salt;
    `tags` keep the seeds of different derivations apart."""
    h1 = _hash_words(lo, hi, salt, torch.full_like(lo, tags[0]))
    h2 = _hash_words(lo, hi, salt, torch.full_like(lo, tags[1]))
    return (h1 << 30) | (h2 >> 2)
