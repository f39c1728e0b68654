"""Next-scale token layout (VAR): which sequence positions belong to which scale.

A next-scale model generates its token maps coarse to fine: scale k is a pn_k x pn_k map, and the
sequence concatenates the maps in order (each raster), so scale k holds positions
[begin_k, end_k). A query at a position of scale k sees every position of scales 0..k (block
causal). For VAR the cache slot of a position is the position itself (no condition slots).
"""

from __future__ import annotations

from functools import cached_property

import torch


class Scales:
    """Sizes and offsets of the scales of `patch_nums` (e.g. 1,2,3,4,5,6,8,10,13,16: 680 positions)."""

    def __init__(self, patch_nums):
        self.patch_nums = tuple(int(p) for p in patch_nums)
        if not self.patch_nums or any(p < 1 for p in self.patch_nums):
            raise ValueError(f"patch_nums must be positive, got {list(patch_nums)}")
        self.sizes = [p * p for p in self.patch_nums]
        self.begins = [sum(self.sizes[:k]) for k in range(len(self.sizes))]
        self.ends = [b + s for b, s in zip(self.begins, self.sizes)]

    def __len__(self) -> int:
        return len(self.patch_nums)

    @property
    def total(self) -> int:
        """Positions in all scales (680 for VAR's 256 px layout)."""
        return self.ends[-1]

    @property
    def largest(self) -> int:
        """Positions of the largest scale (the widest regular step)."""
        return max(self.sizes)

    @cached_property
    def level(self) -> torch.Tensor:
        """[total] int64: the scale of each position."""
        return torch.cat([torch.full((s,), k, dtype=torch.int64) for k, s in enumerate(self.sizes)])

    @cached_property
    def level_end(self) -> torch.Tensor:
        """[n_scales] int64: end_k (one past the last position of scale k)."""
        return torch.tensor(self.ends, dtype=torch.int64)

    def table(self, name: str, device) -> torch.Tensor:
        """`begins`, `sizes` or `ends` as an int64 tensor on `device` (cached per device)."""
        key = (name, str(device))
        cache = self.__dict__.setdefault("_tables", {})
        if key not in cache:
            cache[key] = torch.tensor(getattr(self, name), dtype=torch.int64, device=device)
        return cache[key]

    def visible_mask(self, positions: torch.Tensor, s_max: int) -> torch.Tensor:
        """[B,1,q,S] bool: a query at sequence position p sees slots [0, end of p's scale) (block causal)."""
        dev = positions.device
        end = self.level_end.to(dev)[self.level.to(dev)[positions.clamp(0, self.total - 1)]]
        return (torch.arange(s_max, device=dev).view(1, 1, -1) < end.unsqueeze(-1)).unsqueeze(1)
