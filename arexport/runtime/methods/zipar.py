"""`zipar`: ZipAR next-set decoding on the token step — several image rows in flight at once (lossy).

ZipAR (He et al., ICML 2025) exploits spatial locality: row r + 1 starts before row r is finished,
once row r has `window` tokens, and every step decodes one token in each active row. The schedule
depends only on the grid and the window, never on the tokens, so it is planned once (`zipar_plan`):

* the prefill samples token 0; row 0 is then decoded sequentially, one token per step;
* row 1 starts once row 0 is complete (its first query feeds row 0's last token, as raster AR does);
* row r >= 2 starts the step after row r - 1 reaches `window` tokens. The token raster AR would feed
  to predict (r, 0) — the last of row r - 1 — does not exist yet, so ZipAR feeds a stand-in at the
  position of (r - 1, W - 1): the newest token of row r - 2 when row r - 1 reached the window (the
  vertical neighbour's row; (r - 2, W - 1) once that row is complete);
* a row's own next query feeds its newest token at that token's position;
* once row r (0 < r < H - 1) is complete, its last token is fed the next step (logits unused) so
  its K/V replaces the stand-in's at that position.

Masks: a query at grid position p sees the condition and every fed token at a position <= p, fed in
an earlier step or in this one, except a stand-in already replaced. The cache is kept in generation
order (each step writes its q tokens contiguously from the row's length, as every token step does),
so the replaced stand-in stays in the cache and the mask hides it. This is the official decoding
order and visibility with one deliberate difference: the official code writes K/V at raster slots of
a zero-initialised cache and its causal mask also shows the not-yet-generated slots below p (zero
keys and values, which still take softmax weight); here those slots are hidden, so a query sees
exactly the tokens generated before it.

ZipAR is lossy: its tokens are not distributed as raster AR's (a row is sampled before the row above
it is complete). The stand-in is the vertical neighbour of the slot it fills only once row r - 2 is
complete when row r starts, i.e. for window >= W / 2; below that it is a token from the middle of
row r - 2 placed at the end of row r - 1, and quality drops (benchmarks/zipar_masks_demo.py: on the
8x8 demo window 2 loses about 12 points of accuracy with either mask, window 4 about 0.5). `window >= W` would be raster AR; the official code's bookkeeping breaks there, so
windows are limited to [2, W - 1].

Images of one batch may sit at different steps: the batch step feeds the largest query count and
shorter rows pad into their cache lookahead (pads see only the condition; nothing reads them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from arexport.errors import ArexportError
from arexport.runtime.methods.base import Decoder, Method, Options, option, register
from arexport.runtime.sampling import sample_logits

OFFICIAL_WINDOW = 8  # ThisisBillhe/ZipAR sample_c2i_ddp_zipar.py: --zipar-window-size default


@dataclass(frozen=True)
class Feed:
    """One token fed in a ZipAR step: the raster index of the token fed, the grid position it is fed
    at (RoPE and mask order), and the raster index its logits sample (-1: K/V only)."""

    src: int
    pos: int
    target: int


def zipar_plan(grid: int, window: int, rows: Optional[int] = None) -> list[list[Feed]]:
    """The steps after the prefill for an image of `rows` (default: grid) rows of `grid` tokens, each a
    list of Feeds by ascending position (Emu3 and Lumina-mGPT rows carry their end-of-line token).

    Raises ArexportError unless 2 <= window <= grid - 1."""
    h, w = rows or grid, grid
    if not 2 <= window <= w - 1:
        raise ArexportError(f"zipar window must be in [2, {w - 1}] on a {h}x{w} grid, got {window} (a window of the "
                            "whole row is raster AR: use --method ar)")
    count = [0] * h  # tokens sampled per row
    count[0] = 1  # token 0 comes from the prefill
    active, started = [0], {0}
    stand_in: dict[int, int] = {}  # a starting row -> the raster index fed for its first query
    refeed: Optional[int] = None  # a row completed last step whose last token is fed now
    steps: list[list[Feed]] = []
    while active:
        feeds = []
        if refeed is not None:
            last = refeed * w + w - 1
            feeds.append(Feed(last, last, -1))
            refeed = None
        for r in active:
            c = count[r]
            if c > 0:  # the row's newest token at its own position
                src = pos = r * w + c - 1
            else:  # a row start: fed at the position of the last token of the row above
                pos = r * w - 1
                src = pos if r == 1 else stand_in[r]  # row 1: row 0 is complete, its last token is real
            feeds.append(Feed(src, pos, r * w + c))
        steps.append(feeds)
        nxt = []
        for r in active:
            count[r] += 1
            if r >= 1 and count[r] == window and r + 1 < h and r + 1 not in started:
                nxt.append(r + 1)  # rows update in ascending order: row r - 1's count is this step's
                stand_in[r + 1] = (r - 1) * w + count[r - 1] - 1
            if count[r] == w:
                if r == 0:
                    nxt.append(1)
                elif r < h - 1:
                    refeed = r
        for r in nxt:
            started.add(r)
        active = sorted([r for r in active if count[r] < w] + nxt)
    return steps


def plan_tables(plan: list[list[Feed]], device) -> dict[str, torch.Tensor]:
    """The plan as tensors: src, pos, target [steps, Q] (pads: 0, 0, -1), count and first entry [steps],
    and vis [steps, Q, E] (query j of step k sees entry e; E = every fed token, generation order)."""
    n_steps, q = len(plan), max(len(s) for s in plan)
    entries = [(k, f.pos) for k, s in enumerate(plan) for f in s]
    e_total = len(entries)
    replaced = [n_steps] * e_total  # step at which a later feed at the same position replaces entry e
    last_at: dict[int, int] = {}
    for e, (k, p) in enumerate(entries):
        if p in last_at:
            replaced[last_at[p]] = k
        last_at[p] = e
    src = torch.zeros(n_steps, q, dtype=torch.int64)
    pos = torch.zeros(n_steps, q, dtype=torch.int64)
    tgt = torch.full((n_steps, q), -1, dtype=torch.int64)
    vis = torch.zeros(n_steps, q, e_total, dtype=torch.bool)
    count = torch.tensor([len(s) for s in plan], dtype=torch.int64)
    first = torch.cumsum(count, 0) - count
    ek = torch.tensor([k for k, _ in entries])
    ep = torch.tensor([p for _, p in entries])
    er = torch.tensor(replaced)
    for k, feeds in enumerate(plan):
        positions = [f.pos for f in feeds]
        if len(set(positions)) != len(positions):
            raise ArexportError(f"zipar plan step {k} feeds two tokens at one position")  # the plan's own invariant
        live = (ek <= k) & (er > k)
        for j, f in enumerate(feeds):
            src[k, j], pos[k, j], tgt[k, j] = f.src, f.pos, f.target
            vis[k, j] = live & (ep <= f.pos)
    return {name: t.to(device) for name, t in
            dict(src=src, pos=pos, target=tgt, vis=vis, count=count, first=first).items()}


@dataclass(frozen=True)
class ZipAROptions(Options):
    window: Optional[int] = option(None, f"tokens row r must have before row r + 1 starts ({OFFICIAL_WINDOW} when not given, the "
                                   "official value, or grid - 1 on grids of 8 columns or fewer); in [2, grid - 1]",
                                   flag="--window")

    def validate(self):
        if self.window is not None and self.window < 2:
            raise ArexportError(f"zipar window must be >= 2, got {self.window}")
        return self


class ZipARDecoder(Decoder):
    def __init__(self, ctx, capacity: int):
        super().__init__(ctx, capacity, 2 if ctx.params.uses_cfg else 1)
        spec, s = self.spec, self.slots
        grid = spec.grid_size
        if spec.n_tokens % grid:
            raise ArexportError(f"zipar needs a raster of whole rows; {spec.name} has {spec.n_tokens} tokens on a "
                                f"{grid}-wide grid")
        window = self.opts.window if self.opts.window is not None else min(OFFICIAL_WINDOW, grid - 1)
        self.window = window
        self.plan = zipar_plan(grid, window, spec.n_tokens // grid)
        self.t = plan_tables(self.plan, s.device)
        q_max = self.t["src"].shape[1]
        if q_max > self.engine.max_q:
            raise ArexportError(f"zipar window {window} runs up to {q_max} rows at once, more than this engine's largest "
                                f"step of {self.engine.max_q} tokens: use a larger --window or rebuild with a larger "
                                "--verify-len")
        # the batch step pads short rows up to q_max past their own entries
        # the cache holds every fed token (n_tokens - 1 plus grid - 2 re-fed row ends) and the batch
        # step pads short rows up to q_max past their own entries
        lookahead = max(0, int(self.t["first"][-1]) + q_max - spec.n_tokens)
        try:
            cache = self.engine.allocate(capacity * self.cfg.per_image, lookahead=lookahead)
        except ArexportError as e:
            raise ArexportError(f"zipar window {window} on a {spec.n_tokens // grid}x{grid} grid needs {lookahead} cache slots past the image "
                                f"(re-fed row ends and batch padding): {e}") from None
        self.cache = s.cache(cache)
        self.tokens = s.image_tensor((spec.n_tokens + 1,))  # raster order; the extra column takes pad samples
        self.k = s.image_tensor(())  # next plan step
        self.base: Optional[int] = None  # condition slots (the prefill's length)

    def start(self, a, b, conds):
        s = self.slots
        rows = self.cfg.conditions(self.engine, conds)
        logits = self.prefill(self.engine, self.cache, a, b, rows)
        view = self.cache.view(*s.rows_of(a, b))
        base = int(view.length[0])
        if self.base is None:
            self.base = base
        if bool((view.length != self.base).any()):
            raise ArexportError("zipar needs the same condition length for every image")  # a family contract
        need = self.base + int(self.t["first"][-1]) + self.t["src"].shape[1]  # the last step's writes, padded
        if need > self.cache.s_max:
            raise ArexportError(f"zipar needs {need} cache slots; this engine's cache has {self.cache.s_max}")
        self.tokens[a:b, 0] = self.first_token(logits, a, b)
        self.k[a:b] = 0
        for st in s.stats[a:b]:
            st.forwards += 1
            st.accepted.append(1)

    def advance(self):
        s, t, cfg = self.slots, self.t, self.cfg
        n, rows = s.n, s.rows
        k = self.k[:n]
        q = int(t["count"][k].max())
        view = self.cache.view(0, rows)
        write = view.length.clone()
        src, pos, tgt = t["src"][k, :q], t["pos"][k, :q], t["target"][k, :q]
        feed = self.tokens[:n].gather(1, src)
        mask = torch.zeros(rows, 1, q, self.cache.s_max, dtype=torch.bool, device=s.device)
        mask[:, 0, :, :self.base] = view.key_valid[:, None, :self.base]
        e = t["vis"].shape[2]
        mask[:, 0, :, self.base:self.base + e] = cfg.expand(t["vis"][k, :q])
        logits = self.engine.step(view, cfg.expand(feed), cfg.expand(pos), write, mask)
        view.length += cfg.expand(t["count"][k])
        params = self.params
        guided = cfg.guide(logits, tgt.clamp(min=0), params)
        new = sample_logits(guided, params, s.uniform(q))
        self.tokens[:n].scatter_(1, torch.where(tgt >= 0, tgt, self.spec.n_tokens), new)
        made = (tgt >= 0).sum(1).tolist()
        self.k[:n] += 1
        for st, m in zip(s.stats[:n], made):
            st.forwards += 1
            st.accepted.append(m)
        return s.where(self.k[:n] == len(self.plan))

    def finish(self, i):
        return self.finished(i, self.tokens[i, :self.spec.n_tokens].clone())


@register("zipar")
class ZipARMethod(Method):
    """ZipAR next-set decoding: 1 + (W - 1) + (H - 2) * window + W forwards per image (lossy)."""

    Options = ZipAROptions
    decoder_class = ZipARDecoder
    help = ("ZipAR next-set decoding: a row starts once the row above has --window tokens, one token per active row "
            "per step (LOSSY: not raster AR's distribution)")
