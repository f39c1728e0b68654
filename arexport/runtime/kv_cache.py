"""Static KV cache: buffers allocated once per (batch, slots), per-row lengths, masks on device.

Slots are generation order (slot = cond_len + how many tokens were fed before), not grid
positions; positions travel separately and only drive RoPE. A rejected draft needs no rollback:
its slots lie past `length`, are hidden by every mask, and the next step overwrites them. Slots
past a row's committed length are its *lookahead*: a batch step whose rows feed different numbers
of tokens pads the short rows into their own lookahead, which nothing reads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch

from arexport.budget import check as check_budget, kv_cache_bytes


@dataclass
class KVCache:
    """Per-layer K and V buffers [B, H_kv, S, D] plus bookkeeping for B rows."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: torch.Tensor  # [B] int64: committed slots per row
    key_valid: torch.Tensor  # [B, S] bool: False for padded condition slots
    _views: dict = field(default_factory=dict, repr=False, compare=False)
    _buffers: Optional[tuple] = field(default=None, repr=False, compare=False)  # (keys, values, buffer_key())

    @classmethod
    def allocate(cls, spec, batch: int, dtype: torch.dtype, device, slots: int) -> "KVCache":
        """Zeroed buffers for `batch` rows of `slots` slots."""
        shape = spec.cache_shape(batch, slots)
        itemsize = torch.empty((), dtype=dtype).element_size()
        check_budget(f"a KV cache of {batch} rows x {slots} slots", kv_cache_bytes(spec, batch, slots, itemsize), device,
                     "use a smaller batch, fewer candidates, or an engine with a shorter cache")
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.n_cache_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.n_cache_layers)]
        return cls(keys, values, torch.zeros(batch, dtype=torch.int64, device=device),
                   torch.ones(batch, slots, dtype=torch.bool, device=device))

    def buffer_key(self) -> tuple:
        """The row shape and addresses of its K and V buffers (what a backend's standing binding of
        this cache depends on), worked out once: a cache's buffers never move (views included)."""
        have = self._buffers
        if have is None or have[0] is not self.keys or have[1] is not self.values:
            have = self._buffers = (self.keys, self.values, (
                tuple(self.keys[0].shape), tuple(k.data_ptr() for k in self.keys), tuple(v.data_ptr() for v in self.values)))
        return have[2]

    @property
    def batch(self) -> int:
        return self.length.shape[0]

    @property
    def s_max(self) -> int:
        return self.key_valid.shape[1]

    @property
    def device(self) -> torch.device:
        return self.length.device

    def view(self, start: int, stop: int) -> "KVCache":
        """Rows [start, stop) as views: engine calls on the view write the shared buffers. The same
        view object comes back for the same rows (the buffers never move), so backends can keep
        per-view state such as a standing IOBinding."""
        have = self._views.get((start, stop))
        if have is not None:
            return have
        have = self._views[(start, stop)] = KVCache([k[start:stop] for k in self.keys], [v[start:stop] for v in self.values],
                       self.length[start:stop], self.key_valid[start:stop])
        return have

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Row dst[i] becomes a copy of row src[i] (whole buffers and bookkeeping)."""
        for buf in self.keys + self.values:
            buf[dst] = buf[src]
        self.length[dst] = self.length[src]
        self.key_valid[dst] = self.key_valid[src]

    def causal_mask(self, write_index: torch.Tensor, q: int) -> torch.Tensor:
        """[B,1,q,S] bool: query i (slot write_index+i) sees valid slots <= its own slot, and itself."""
        kv = self.key_valid
        slots, lanes = _mask_ranges(kv.shape[1], q, kv.device)
        qslot = write_index.view(-1, 1, 1) if q == 1 else write_index.view(-1, 1, 1) + lanes
        mask = slots <= qslot
        mask &= kv[:, None]
        mask |= slots == qslot
        return mask[:, None]

    def block_mask(self, write_index: torch.Tensor, q: int, fed=None) -> torch.Tensor:
        """[B,1,q,S] bool: every new token sees all committed slots and the row's `fed` [B] new slots
        (default all q; no causal order inside the block: ARPG's parallel step)."""
        slots = arange(self.s_max, self.device).view(1, 1, -1)
        end = (write_index + (q if fed is None else fed)).view(-1, 1, 1)
        mask = (slots < end) & self.key_valid.unsqueeze(1)
        return mask.expand(-1, q, -1).unsqueeze(1)


@functools.lru_cache(maxsize=64)
def arange(n: int, device: torch.device) -> torch.Tensor:
    """0 .. n-1 on `device`, made once per (n, device): masks and lanes are built every step.
    Shared: callers must not write to it."""
    return torch.arange(n, device=device)


@functools.lru_cache(maxsize=64)
def _mask_ranges(slots: int, q: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots 0 .. slots-1 as [1, 1, slots] and query lanes 0 .. q-1 as [1, q, 1] (shared, read-only)."""
    return arange(slots, device).view(1, 1, -1), arange(q, device).view(1, q, 1)
