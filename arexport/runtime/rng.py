"""Counter-based random numbers, one independent stream per batch row, computed on device.

Each row has a 63-bit seed and a draw counter. A draw hashes (seed, counter, lane) with a
32-bit integer mixer (two rounds of the lowbias32 finaliser over several words) into 53-bit uniforms,
so a row's numbers depend only on its own seed and how many draws it has made: the same request
gives the same image whatever it is batched with, on any device, with no host round trip.
"""

from __future__ import annotations

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
    if seeds.device.type == "cpu":
        return torch.from_numpy(_uniforms_np(seeds.numpy(), counters.numpy(), n_lanes, stream))
    return _uniforms_torch(seeds, counters, n_lanes, stream)


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


_U32, _U16, _U15 = np.uint64(_M32), np.uint64(16), np.uint64(15)
_C1, _C2 = np.uint64(0x7FEB352D), np.uint64(0x846CA68B)


def _mix32_np(x: np.ndarray) -> np.ndarray:
    """lowbias32 in place on a uint64 array holding 32-bit values (products wrap mod 2**64, so
    their low 32 bits are exact)."""
    x &= _U32
    x ^= x >> _U16
    x *= _C1
    x &= _U32
    x ^= x >> _U15
    x *= _C2
    x &= _U32
    x ^= x >> _U16
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


def _uniforms_np(seeds: np.ndarray, counters: np.ndarray, n_lanes: int, stream: int) -> np.ndarray:
    """`uniforms` in numpy: the same words, the same mixer, the same bits. The per-row words are
    hashed with Python ints (a decode step has a handful of rows; numpy's per-call cost is larger)."""
    rows = []
    for seed, counter in zip(seeds.tolist(), counters.tolist()):
        h = 0
        for i, w in enumerate((seed & _M32, (seed >> 32) & _M32, counter & _M32)):
            h = _mix32_int(h ^ ((w + _GOLDEN * (i + 1)) & _M32))
        rows.append(h)
    if len(rows) * n_lanes <= _SMALL:  # a decode step's few draws: Python ints beat numpy's per-call cost
        return np.array([[_finish_int(h, lane, stream) for lane in range(n_lanes)] for h in rows],
                        dtype=np.float64).reshape(len(rows), n_lanes)
    h = np.array(rows, dtype=np.uint64)[:, None]
    h = _mix32_np(h ^ np.arange(_GOLDEN * 4, _GOLDEN * 4 + n_lanes, dtype=np.uint64)[None, :])
    h = _mix32_np(h ^ np.uint64(stream + _GOLDEN * 5))
    halves = _mix32_np(h[None] ^ np.array([_GOLDEN * 6, 1 + _GOLDEN * 6], dtype=np.uint64)[:, None, None])
    bits53 = ((halves[0] >> np.uint64(5)) << np.uint64(26)) | (halves[1] >> np.uint64(6))
    return bits53.astype(np.float64) * (1.0 / (1 << 53))


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
