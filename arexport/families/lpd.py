"""LPD (mit-han-lab/lpd, "Locality-aware Parallel Decoding for Efficient Autoregressive Image
Generation"): a ViT-style decoder that predicts a group of tokens per forward from learnable
position-query tokens (models/lpd.py).

Decoding (`--method lpd`, runtime/methods/lpd.py): forward i feeds the tokens of group i - 1 (the
class token for i = 0) and one query per position of group i; the queries see each other and all
tokens before them, the group's tokens see each other and the tokens before them. Group sizes come
from the reference's lookup table per resolution and step count (`orders/group_sizes_lookup.json`;
the schedules its evaluation scripts use are shipped here). The step graph is the plain `token`
kind; an image takes 1 + N slots plus one group of queries past them.
"""

from __future__ import annotations

import numpy as np
import torch

from arexport.errors import ArexportError
from arexport.families.llamagen import LlamaGenFamily

# mit-han-lab/lpd@f447b83 orders/group_sizes_lookup.json: the schedules of scripts/eval/*.sh
# (grid tokens -> steps -> group sizes)
GROUP_SIZES = {
    256: {20: [1, 2, 4, 5, 7, 8, 10, 11, 12, 14, 15, 16, 17, 18, 18, 19, 19, 20, 20, 20],
          32: [1, 1, 2, 2, 3, 3, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 10, 11, 11, 11, 11, 12, 12, 12, 12, 12, 12, 12,
               12]},
    1024: {48: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 23, 24, 25, 26, 26, 27,
                28, 28, 29, 29, 30, 30, 31, 31, 32, 32, 32, 33, 33, 33, 33, 33, 33, 33, 34]},
}
DEFAULT_STEPS = {256: 20, 1024: 48}


def lpd_group_sizes(n_tokens: int, steps) -> list[int]:
    """Tokens per forward: the reference's table for (n_tokens, steps); steps None = the evaluation
    default (20 at 256 px, 48 at 512 px); steps == n_tokens = one token per forward (any grid)."""
    table = GROUP_SIZES.get(n_tokens, {})
    if steps is None:
        steps = DEFAULT_STEPS.get(n_tokens, n_tokens)
    if steps == n_tokens:
        return [1] * n_tokens
    if steps not in table:
        have = ", ".join(str(s) for s in sorted(table) + [n_tokens])
        raise ArexportError(f"lpd has group sizes for {have} steps on {n_tokens} tokens (the reference's table), got {steps}")
    return list(table[steps])


def lpd_feed_len(sizes: list[int]) -> int:
    """The longest feed: the previous group's tokens plus the next group's queries (class + first group)."""
    return max([1 + sizes[0]] + [n + m for n, m in zip(sizes, sizes[1:])])


def lpd_order(group_sizes: list[int], grid: int, keys: torch.Tensor, repulsion: float, proximity: float = 1.0) -> torch.Tensor:
    """LPD's locality-aware generation order: raster cell indices [N] in generation order.

    The first group is one cell. For each later group, every free cell scores the sum of 1 / distance
    to the generated cells among its 8 neighbours; cells scoring >= `proximity` are taken best first
    unless within `repulsion` (per axis) of a cell already taken for this group; the rest of the group
    is filled by farthest-point sampling (from this group's cells) over the low-score and the skipped
    cells. keys [G, N] uniforms are the randomness: keys[0] picks the first cell (smallest key), keys[g]
    breaks score ties in group g (smaller key first) and picks the first farthest-point cell when the
    group has none yet."""
    n = grid * grid
    if sum(group_sizes) != n or group_sizes[0] != 1:
        raise ArexportError(f"the lpd order needs group sizes starting with 1 and summing to {n}, got {group_sizes}")
    k = keys.double().cpu().numpy()
    rc = np.stack(np.divmod(np.arange(n), grid), 1)  # [N, 2] (row, column)
    taken = np.zeros(n, dtype=bool)
    first = int(np.argmin(k[0]))
    out, taken[first] = [first], True
    near = np.abs(rc[:, None, :] - rc[None, :, :]).max(-1) <= 1  # 8-neighbourhood (and self)
    dist = np.sqrt(((rc[:, None, :] - rc[None, :, :]) ** 2).sum(-1))
    inv = np.where(near & (dist > 0), 1.0 / np.where(dist > 0, dist, 1.0), 0.0)
    for g, size in enumerate(group_sizes[1:], start=1):
        free = np.flatnonzero(~taken)
        score = np.round(inv[free][:, taken].sum(1), 9)  # equal sums tie whatever their order of addition
        ranked = free[np.lexsort((k[g][free], -score))]
        high = set(free[score >= proximity].tolist())
        likely = [c for c in ranked if c in high]
        rest = [c for c in ranked if c not in high]
        chosen, skipped, at = [], [], 0
        while len(chosen) < size and at < len(likely):
            c = likely[at]
            at += 1
            if any(np.abs(rc[c] - rc[s]).max() <= repulsion for s in chosen):
                skipped.append(c)
            else:
                chosen.append(c)
        pool = rest + skipped + likely[at:]
        need = size - len(chosen)
        if need > 0:
            chosen += pool if len(pool) <= need else farthest_points(rc, chosen, pool, need, k[g])
        out += chosen
        taken[chosen] = True
    return torch.tensor(out)


def farthest_points(rc: np.ndarray, existing: list[int], pool: list[int], need: int, key: np.ndarray) -> list[int]:
    """`need` cells of `pool` (len > need), each the farthest (Euclidean, first on ties) from `existing`
    and those picked before it; the smallest key starts when `existing` is empty."""
    pts = rc[pool].astype(np.float64)
    have = rc[existing].astype(np.float64)
    picked: list[int] = []
    for _ in range(need):
        if len(have) == 0:
            i = int(np.argmin(key[pool]))
        else:
            d = np.sqrt(((pts[:, None, :] - have[None, :, :]) ** 2).sum(-1)).min(1)
            d[picked] = 0
            i = int(np.argmax(d))
        picked.append(i)
        have = np.vstack([have, pts[i:i + 1]]) if len(have) else pts[i:i + 1]
    return [pool[i] for i in picked]


class LPDFamily(LlamaGenFamily):
    """Class-conditional LPD models: LlamaGen's class conditions and VQ-16 images, its own method."""

    name = "lpd"
    methods = ("lpd",)
    default_method = "lpd"
    step_kinds = ("token",)
    default_verify_len = 40  # the 256 px default schedule's longest feed (20 + 20); 512 px needs 67

    def caption_prefill(self, spec) -> bool:
        return False

    def sampling_defaults(self, spec):
        # main.py's defaults with the lpd-l-256 evaluation script's guidance: linear CFG 4.8, no top-k/top-p
        return {"cfg_scale": 4.8, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "cfg_schedule": "linear"}

    def repulsion(self, spec) -> float:
        """The lpd order's repulsion distance: the evaluation scripts' for the model (1, the reference's
        default, when the spec records none)."""
        return float(spec.extra.get("lpd_repulsion", 1.0))

    def query_token(self, spec) -> int:
        """Token id of the position query."""
        t = spec.extra.get("query_token")
        if not isinstance(t, int):
            raise ArexportError(f"{spec.name} records no query_token: not an LPD model spec")
        return t
