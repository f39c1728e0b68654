"""Static KV cache: buffers allocated once per (batch, S_max), per-row lengths, masks on device.

Slots are generation order (slot = cond_len + how many tokens were fed before), not grid
positions; positions travel separately and only drive RoPE. A rejected draft needs no rollback:
its slots lie past `length`, are hidden by every mask, and the next step overwrites them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arexport.spec import ModelSpec


@dataclass
class KVCache:
    """Per-layer K and V buffers [B, H_kv, S_max, D] plus bookkeeping for B rows."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: torch.Tensor  # [B] int64: committed slots per row
    key_valid: torch.Tensor  # [B, S_max] bool: False for padded condition slots

    @classmethod
    def allocate(cls, spec: ModelSpec, batch: int, dtype: torch.dtype, device) -> "KVCache":
        """Zeroed buffers for `batch` rows."""
        shape = spec.cache_shape(batch)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.n_cache_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.n_cache_layers)]
        return cls(
            keys,
            values,
            torch.zeros(batch, dtype=torch.int64, device=device),
            torch.ones(batch, spec.s_max, dtype=torch.bool, device=device),
        )

    @property
    def batch(self) -> int:
        return self.length.shape[0]

    @property
    def s_max(self) -> int:
        return self.key_valid.shape[1]

    @property
    def device(self) -> torch.device:
        return self.length.device

    def reset(self) -> None:
        """Forget all rows (buffers are not cleared: masks hide stale slots)."""
        self.length.zero_()
        self.key_valid.fill_(True)

    def causal_mask(self, write_index: torch.Tensor, q: int) -> torch.Tensor:
        """[B,1,q,S] bool: query i (slot write_index+i) sees valid slots <= its own slot, and itself."""
        slots = torch.arange(self.s_max, device=self.device)
        qslot = write_index.view(-1, 1, 1) + torch.arange(q, device=self.device).view(1, q, 1)
        mask = (slots.view(1, 1, -1) <= qslot) & self.key_valid.unsqueeze(1)
        mask |= slots.view(1, 1, -1) == qslot
        return mask.unsqueeze(1)

    def block_mask(self, write_index: torch.Tensor, q: int) -> torch.Tensor:
        """[B,1,q,S] bool: every new token sees all committed slots and all q new slots (no causal
        order inside the block; ARPG's parallel step)."""
        slots = torch.arange(self.s_max, device=self.device).view(1, 1, -1)
        end = (write_index + q).view(-1, 1, 1)
        mask = (slots < end) & self.key_valid.unsqueeze(1)
        return mask.expand(-1, q, -1).unsqueeze(1)

    def tree_mask(self, write_index: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
        """[B,1,q,S] bool for a draft tree: committed slots plus the new nodes in `ancestors`.

        ancestors: [B, q, q] bool, ancestors[b, i, j] = node j is i itself or one of its ancestors.
        """
        b, q, _ = ancestors.shape
        slots = torch.arange(self.s_max, device=self.device)
        past = (slots.view(1, 1, -1) < write_index.view(-1, 1, 1)) & self.key_valid.unsqueeze(1)
        past = past.expand(b, q, -1).clone()
        idx = (write_index.view(-1, 1) + torch.arange(q, device=self.device).view(1, -1)).clamp(max=self.s_max - 1)
        past.scatter_(2, idx.unsqueeze(1).expand(b, q, q), ancestors)
        return past.unsqueeze(1)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Replace every row by the row it is mapped to (rows [B] int64): copies candidates in place."""
        for buf in self.keys + self.values:
            buf.copy_(buf.index_select(0, rows))
        self.length.copy_(self.length.index_select(0, rows))
        self.key_valid.copy_(self.key_valid.index_select(0, rows))
