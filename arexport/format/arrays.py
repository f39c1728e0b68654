"""Arrays an engine directory carries beside its graphs, computed the same way by the builder and
by the torch backend: the latent-space neighbour table LANTERN reads."""

from __future__ import annotations

import torch

TIE_MARGIN = 64  # candidates kept past the k-th, so that codes tied with the k-th are among them


def latent_neighbors(codebook: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """[V, min(k, V-1)] int64: each code's nearest other codes by L2 distance, nearest first; ties
    ordered by code index (the order of a stable full sort of each distance row).

    Each row takes its k + TIE_MARGIN smallest distances (topk), orders those by (distance, index) and
    keeps k. That equals the full stable sort whenever every code as near as the k-th is a candidate,
    which holds when the farthest candidate is strictly farther than the k-th; rows where it does not
    (more than TIE_MARGIN codes tied at the k-th distance) are fully sorted. A full sort of every
    16384-wide row cost a LlamaGen build ~20 s of one core; topk costs ~2 s."""
    v = codebook.shape[0]
    k = min(k, v - 1)
    m = min(v, k + TIE_MARGIN)
    cb = codebook.float()
    out = torch.empty(v, k, dtype=torch.long)
    for s in range(0, v, chunk):
        d = torch.cdist(cb[s:s + chunk], cb)
        rows = torch.arange(d.shape[0])
        d[rows, rows + s] = float("inf")  # exclude self
        vals, cand = torch.topk(d, m, dim=1, largest=False, sorted=False)
        cand, by_index = cand.sort(dim=1)  # candidates by index, then a stable sort by distance keeps index order in ties
        vals = vals.gather(1, by_index)
        order = torch.argsort(vals, dim=1, stable=True)
        idx = cand.gather(1, order[:, :k])
        if m < v:
            kth = vals.gather(1, order[:, k - 1:k]).squeeze(1)
            short = ~(vals.max(dim=1).values > kth)  # a code tied with the k-th may be left out: sort the whole row
            if bool(short.any()):
                idx[short] = torch.argsort(d[short], dim=1, stable=True)[:, :k]
        out[s:s + chunk] = idx.cpu()
    return out
