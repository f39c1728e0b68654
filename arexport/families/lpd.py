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

import functools

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


@functools.lru_cache(maxsize=4)
def _grid_tables(grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per grid (read-only): cell coordinates [N, 2] (row, column), the proximity weight of each cell
    pair [N, N] (1 / distance between distinct 8-neighbours, else 0) and the per-axis (Chebyshev)
    distance of each pair [N, N]."""
    n = grid * grid
    rc = np.stack(np.divmod(np.arange(n), grid), 1)
    diff = rc[:, None, :] - rc[None, :, :]
    cheb = np.abs(diff).max(-1)
    dist = np.sqrt((diff ** 2).sum(-1))
    inv = np.where((cheb <= 1) & (dist > 0), 1.0 / np.where(dist > 0, dist, 1.0), 0.0)
    for t in (rc, inv, cheb):
        t.flags.writeable = False
    return rc, inv, cheb


def lpd_order(group_sizes: list[int], grid: int, keys: torch.Tensor, repulsion: float, proximity: float = 1.0) -> torch.Tensor:
    """LPD's locality-aware generation order: raster cell indices [N] in generation order.

    The first group is one cell. For each later group, every free cell scores the sum of 1 / distance
    to the generated cells among its 8 neighbours; cells scoring >= `proximity` are taken best first
    unless within `repulsion` (per axis) of a cell already taken for this group; the rest of the group
    is filled by farthest-point sampling (from this group's cells) over the low-score and the skipped
    cells. keys [G, N] uniforms are the randomness: keys[0] picks the first cell (smallest key), keys[g]
    breaks score ties in group g (smaller key first) and picks the first farthest-point cell when the
    group has none yet.

    Vectorised: scores accumulate as cells are taken, and the repulsion scan jumps from one accepted
    cell to the next over a mask of the cells the group's picks block (same orders as a cell-by-cell scan)."""
    n = grid * grid
    if sum(group_sizes) != n or group_sizes[0] != 1:
        raise ArexportError(f"the lpd order needs group sizes starting with 1 and summing to {n}, got {group_sizes}")
    k = keys.double().cpu().numpy()
    rc, inv, cheb = _grid_tables(grid)
    taken = np.zeros(n, dtype=bool)
    first = int(np.argmin(k[0]))
    out, taken[first] = [first], True
    score_all = inv[:, first].copy()  # each cell's proximity score against the taken cells
    for g, size in enumerate(group_sizes[1:], start=1):
        free = np.flatnonzero(~taken)
        score = np.round(score_all[free], 9)  # equal sums tie whatever their order of addition
        order = np.lexsort((k[g][free], -score))
        ranked, high = free[order], score[order] >= proximity
        likely, rest = ranked[high], ranked[~high]
        blocked = np.zeros(n, dtype=bool)  # cells within `repulsion` of one this group took
        chosen, skipped, at = [], [], 0
        while len(chosen) < size and at < len(likely):
            open_at = np.flatnonzero(~blocked[likely[at:]])
            stop = at + int(open_at[0]) if len(open_at) else len(likely)
            skipped.extend(likely[at:stop].tolist())
            if stop == len(likely):
                at = stop
                break
            c = int(likely[stop])
            chosen.append(c)
            blocked |= cheb[c] <= repulsion
            at = stop + 1
        pool = rest.tolist() + skipped + likely[at:].tolist()
        need = size - len(chosen)
        if need > 0:
            chosen += pool if len(pool) <= need else farthest_points(rc, chosen, pool, need, k[g])
        out += chosen
        taken[chosen] = True
        score_all += inv[:, chosen].sum(1)
    return torch.tensor(out)


def farthest_points(rc: np.ndarray, existing: list[int], pool: list[int], need: int, key: np.ndarray) -> list[int]:
    """`need` cells of `pool` (len > need), each the farthest (Euclidean, first on ties) from `existing`
    and those picked before it; the smallest key starts when `existing` is empty. The distance to the
    picked set is kept as a running minimum (the same values as recomputing it over the whole set)."""
    pts = rc[pool].astype(np.float64)
    near = np.full(len(pool), np.inf)

    def add(p: np.ndarray) -> None:
        d = pts - p
        np.minimum(near, np.sqrt(d[:, 0] ** 2 + d[:, 1] ** 2), out=near)

    for p in rc[existing].astype(np.float64):
        add(p)
    picked: list[int] = []
    for _ in range(need):
        if not existing and not picked:
            i = int(np.argmin(key[pool]))
        else:
            d = near.copy()
            d[picked] = 0
            i = int(np.argmax(d))
        picked.append(i)
        add(pts[i])
    return [pool[i] for i in picked]


# -- precomputed orders (the official evaluation's --lpd_order_file) ------------------------------------
MAX_ORDERS_FILE_BYTES = 512 << 20  # the official 60,000 orders at 512 px are about 300 MB of JSON
_ORDERS_CACHE: dict = {}  # (path, size, mtime, n_tokens) -> orders; the last file read, reused by later batches


def read_orders_file(path: str, n_tokens: int) -> torch.Tensor:
    """The orders of an official LPD orders file (orders/run_lpd_order.py writes it: a JSON array of
    arrays, each the raster cell indices of one image in generation order): [R, N] int16 (int32 past
    32767 tokens). Refused with one line naming the problem: a missing or oversized file (checked
    before reading), anything but arrays of non-negative integers, a row of another length than the
    model's N tokens, a row that is not a permutation of 0..N-1. The last file read stays cached
    (keyed by its path, size and modification time)."""
    import os

    try:
        st = os.stat(path)
    except OSError as e:
        raise ArexportError(f"lpd orders file {path}: {e.strerror or e}") from None
    if st.st_size > MAX_ORDERS_FILE_BYTES:
        raise ArexportError(f"lpd orders file {path} is {st.st_size} bytes; at most {MAX_ORDERS_FILE_BYTES} are read "
                            "(the official 60,000 orders at 512 px take about 300 MB)")
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, n_tokens)
    if key in _ORDERS_CACHE:
        return _ORDERS_CACHE[key]
    with open(path, "rb") as f:
        text = f.read(MAX_ORDERS_FILE_BYTES + 1)
    orders = parse_orders(text, n_tokens, path)
    _ORDERS_CACHE.clear()
    _ORDERS_CACHE[key] = orders
    return orders


def parse_orders(text: bytes, n_tokens: int, name: str = "orders") -> torch.Tensor:
    """A JSON array of R arrays of N non-negative integers -> [R, N] int16/int32, each row checked to be
    a permutation of 0..N-1 (see read_orders_file). Parsed with NumPy over the bytes, without a Python
    object per number (the 512 px file holds 61 million)."""
    compact = text.translate(None, b" \t\r\n")
    del text
    if compact.translate(None, b"0123456789,[]"):
        raise ArexportError(f"lpd orders file {name} is not a JSON array of arrays of non-negative integers "
                            "(it holds other characters)")
    if compact in (b"[]", b"[[]]") or not (compact.startswith(b"[[") and compact.endswith(b"]]")):
        raise ArexportError(f"lpd orders file {name} is not a non-empty JSON array of arrays of integers")
    body = compact[2:-2].replace(b"],[", b";")
    del compact
    if b"[" in body or b"]" in body:
        raise ArexportError(f"lpd orders file {name} is not a JSON array of arrays of integers (nested or misplaced brackets)")
    raw = np.frombuffer(body, dtype=np.uint8)
    seps = np.flatnonzero((raw == ord(",")) | (raw == ord(";")))
    digits = np.diff(np.concatenate([[-1], seps, [len(raw)]])) - 1  # characters of each number
    if digits.min() < 1:
        raise ArexportError(f"lpd orders file {name} has an empty entry or an empty order")
    if digits.max() > 9:
        raise ArexportError(f"lpd orders file {name} holds a number of {int(digits.max())} digits; cell indices are "
                            f"below {n_tokens}")
    ends = np.concatenate([np.flatnonzero(raw[seps] == ord(";")) + 1, [len(seps) + 1]])  # numbers before each row end
    lengths = np.diff(np.concatenate([[0], ends]))
    wrong = np.flatnonzero(lengths != n_tokens)
    if len(wrong):
        r = int(wrong[0])
        raise ArexportError(f"lpd orders file {name}: order {r} has {int(lengths[r])} entries; this model's images have "
                            f"{n_tokens} tokens")
    flat = np.fromstring(body.replace(b";", b","), dtype=np.int32, sep=",")  # text mode: exact for <= 9 digits
    del body, raw
    rows = flat.reshape(len(lengths), n_tokens)
    bad = np.flatnonzero((np.sort(rows, axis=1) != np.arange(n_tokens, dtype=np.int32)).any(1))
    if len(bad):
        r = int(bad[0])
        raise ArexportError(f"lpd orders file {name}: order {r} is not a permutation of the cells 0..{n_tokens - 1}")
    return torch.from_numpy(rows.astype(np.int16 if n_tokens <= 32767 else np.int32))


class LPDFamily(LlamaGenFamily):
    """Class-conditional LPD models: LlamaGen's class conditions and VQ-16 images, its own method."""

    name = "lpd"
    methods = ("lpd",)
    default_method = "lpd"
    step_kinds = ("token",)
    default_verify_len = 40  # the 256 px default schedule's longest feed (20 + 20); 512 px: 67 (default_query_len)

    def caption_prefill(self, spec) -> bool:
        return False

    def sampling_defaults(self, spec):
        # main.py's defaults with the lpd-l-256 evaluation script's guidance: linear CFG 4.8, no top-k/top-p
        return {"cfg_scale": 4.8, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "cfg_schedule": "linear"}

    def default_query_len(self, spec) -> int:
        """The default schedule's longest feed on this grid (40 at 256 px, 67 at 512 px; one token per
        forward, 2, on grids without a table), at least default_verify_len."""
        return max(self.default_verify_len, lpd_feed_len(lpd_group_sizes(spec.n_tokens, None)))

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
