"""Arrays an engine directory carries beside its graphs, computed the same way by the builder and
by the torch backend: the latent-space neighbour table LANTERN reads."""

from __future__ import annotations

import torch


def latent_neighbors(codebook: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """[V, min(k, V-1)] int64: each code's nearest other codes by L2 distance, nearest first."""
    v = codebook.shape[0]
    k = min(k, v - 1)
    cb = codebook.float()
    out = torch.empty(v, k, dtype=torch.long)
    for s in range(0, v, chunk):
        d = torch.cdist(cb[s:s + chunk], cb)
        d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = float("inf")  # exclude self
        # stable order for ties: distance, then index
        idx = torch.argsort(d, dim=1, stable=True)[:, :k]
        out[s:s + chunk] = idx.cpu()
    return out
