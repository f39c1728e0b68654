"""`lpd`: LPD's parallel decoding with position queries (mit-han-lab/lpd `LPD.sample_tokens`).

Each image draws its generation order from its own random stream (batch-invariant): LPD's
locality-aware schedule (`--group-order lpd`, families.lpd.lpd_order, the evaluation scripts' choice) or a
uniformly random one (`--group-order random`), or reads it from an official orders file (`--orders FILE`,
families.lpd.read_orders_file: the image whose row seed is s takes the file's order s mod R, so per-image
seeds 0, 1, 2, ... walk the file in order as the official evaluation does). With
group sizes g_0 .. g_{G-1} (families.lpd.lpd_group_sizes) and c_0 = 0, c_{i+1} = 1 + g_0 + .. + g_{i-1},
forward i writes from slot c_i: the class token (i = 0) or the tokens of group i - 1, then one query per
position of group i (slots c_{i+1} .. c_{i+2} - 1, where group i's tokens go the forward after). Masks
are block-causal over the blocks [class, group 0, group 1, ...]: an entry sees every slot before the end
of its own block, so the previous group's tokens see each other and the queries see each other.
Group i is sampled from the queries' outputs.

Guidance: the sampler's schedule at each token's generation index minus one: `linear` with scale g is
the reference's 1 + (g - 1) t / N for the token with t tokens before it.

Images of one batch may be at different forwards (continuous batching): feeds are padded to the
batch's longest, pads written past each row's fed slots, where nothing reads them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from arexport.errors import ArexportError
from arexport.families.lpd import lpd_feed_len, lpd_group_sizes, lpd_order, read_orders_file
from arexport.runtime.kv_cache import arange
from arexport.runtime.methods.base import Method, Options, option, register
from arexport.runtime.methods.random_order import RandomOrderDecoder, generation_order

CLASS = -1  # feed code of the class token; -2 - i: the query for generation index i; >= 0: token i


def lpd_feeds(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feed codes [G, F] (pads repeat the last entry), feed lengths [G], the previous block's length
    per forward [G] (1 for the class) and each group's first generation index [G]."""
    firsts = [sum(sizes[:i]) for i in range(len(sizes))]
    feeds, prev = [], []
    for i, (f, n) in enumerate(zip(firsts, sizes)):
        before = [CLASS] if i == 0 else list(range(firsts[i - 1], f))
        feeds.append(before + [-2 - t for t in range(f, f + n)])
        prev.append(len(before))
    width = lpd_feed_len(sizes)
    return (torch.tensor([r + r[-1:] * (width - len(r)) for r in feeds]), torch.tensor([len(r) for r in feeds]),
            torch.tensor(prev), torch.tensor(firsts))


@dataclasses.dataclass(frozen=True)
class LPDOptions(Options):
    steps: Optional[int] = option(None, "forwards per image: a schedule of LPD's table (20 or 32 at 256 px, 48 at 512 px; "
                                  "default the fewest) or one per token", flag="--steps")
    group_order: str = option("lpd", "lpd generation order: lpd (the locality-aware schedule of the evaluation scripts) or "
                              "random", flag="--group-order", choices=("lpd", "random"))
    repulsion: Optional[float] = option(None, "lpd order: cells of one group stay farther apart than this per axis (default "
                                        "the model's: 2 at 256 px, 3 for lpd-xxl-256, 4 at 512 px)", flag="--repulsion")
    group_sizes: str = option("", "comma-separated tokens per forward summing to the image's tokens (the reference's "
                              "--group_sizes; overrides --steps)", flag="--group-sizes")
    orders: Optional[str] = option(None, "precomputed generation orders: an official orders JSON file (orders/run_lpd_order.py; "
                                   "made for the same group sizes), read instead of computing each image's; the image with "
                                   "row seed s takes order s mod R", flag="--orders")

    def validate(self):
        if self.repulsion is not None and not 0 <= self.repulsion <= 1024:
            raise ArexportError(f"lpd repulsion must be in [0, 1024], got {self.repulsion}")
        if self.group_sizes and parse_group_sizes(self.group_sizes) is None:
            raise ArexportError(f"lpd group-sizes must be comma-separated integers >= 1, got {self.group_sizes!r}")
        if self.orders is not None and self.group_order != "lpd":
            raise ArexportError(f"lpd --orders gives the orders; --group-order {self.group_order} cannot apply with it")
        if self.orders is not None and self.repulsion is not None:
            raise ArexportError("lpd --orders gives the orders; --repulsion (which computes them) cannot apply with it")
        return self


def parse_group_sizes(text: str) -> Optional[list[int]]:
    """'1,2,3' -> [1, 2, 3]; None when not positive integers."""
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        return None
    return sizes if sizes and min(sizes) >= 1 else None


class LPDDecoder(RandomOrderDecoder):
    def __init__(self, ctx, capacity):
        super().__init__(ctx, capacity, 2 if ctx.params.uses_cfg else 1)
        spec, s = self.spec, self.slots
        fam = self.engine.family
        if not hasattr(fam, "query_token"):
            raise ArexportError(f"method lpd needs an LPD model; {spec.name} is a {spec.family} model")
        if self.opts.group_sizes:
            sizes = parse_group_sizes(self.opts.group_sizes)
            if sum(sizes) != spec.n_tokens:
                raise ArexportError(f"lpd group-sizes must sum to the image's {spec.n_tokens} tokens, got {sum(sizes)}")
        else:
            sizes = lpd_group_sizes(spec.n_tokens, self.opts.steps)
        width = lpd_feed_len(sizes)
        if width > self.engine.max_q:
            raise ArexportError(f"lpd with {len(sizes)} steps feeds up to {width} tokens per forward; the engine's maximum "
                                f"query length is {self.engine.max_q}: rebuild with --verify-len >= {width}")
        dev = s.device
        feeds, lengths, prev, firsts = lpd_feeds(sizes)
        self.feeds, self.lengths, self.prev, self.firsts = (t.to(dev) for t in (feeds, lengths, prev, firsts))
        self.sizes = torch.tensor(sizes, device=dev)
        self.n_calls, self.width = len(sizes), max(sizes)
        self.query = fam.query_token(spec)
        self.group_sizes = sizes
        self.repulsion = self.opts.repulsion if self.opts.repulsion is not None else fam.repulsion(spec)
        if self.opts.group_order == "lpd" and sizes[0] != 1:
            raise ArexportError(f"the lpd order starts with a group of one token; group-sizes start with {sizes[0]}")
        # read before the cache is allocated: a bad file costs nothing
        self.file_orders = read_orders_file(self.opts.orders, spec.n_tokens) if self.opts.orders is not None else None
        self.cache = s.cache(self.engine.allocate(capacity * self.cfg.per_image, lookahead=width - 1))
        self.order = s.image_tensor((spec.n_tokens,))  # grid positions in generation order
        self.seq = s.image_tensor((spec.n_tokens + self.width,))  # tokens in generation order; the tail takes unused lanes
        self.c = s.image_tensor(())  # next forward
        self.cls = s.row_tensor((), torch.int64)  # class token per row (null class on guidance rows)

    def sampling_of(self, p):
        if p.cfg_schedule not in ("constant", "linear"):  # index -1 for the first token (see module doc)
            raise ArexportError(f"lpd guides with a constant scale or LPD's linear ramp (cfg-schedule linear), "
                                f"not cfg-schedule {p.cfg_schedule}")
        return p

    def start(self, a, b, conds):
        s = self.slots
        n_tok = self.spec.n_tokens
        if self.file_orders is not None:
            rows = torch.remainder(s.seeds[a:b, 0].cpu(), self.file_orders.shape[0])
            self.order[a:b] = self.file_orders[rows].to(self.order.device, torch.int64)
        elif self.opts.group_order == "random":
            self.order[a:b] = generation_order(s.uniform(n_tok, s.span(a, b))[a:b])
        else:
            keys = s.uniform(len(self.group_sizes) * n_tok, s.span(a, b))[a:b].view(b - a, -1, n_tok)
            self.order[a:b] = torch.stack([lpd_order(self.group_sizes, self.spec.grid_size, k, self.repulsion) for k in keys]
                                          ).to(self.order.device)
        r0, r1, cls = self.fresh_class_rows(a, b, conds)
        self.cls[r0:r1] = cls

    def advance(self):
        s, cfg = self.slots, self.cfg
        n, rows, dev = s.n, s.rows, s.device
        c = self.c[:n]
        fed, prev, size, first = self.lengths[c], self.prev[c], self.sizes[c], self.firsts[c]
        q, m = int(fed.max()), int(size.max())
        code = self.feeds[c][:, :q]  # [n, q]
        gen = torch.where(code >= 0, code, -2 - code).clamp(min=0)
        tok = torch.where(code >= 0, self.seq[:n].gather(1, gen), torch.full_like(code, self.query))
        pos = torch.where(code == CLASS, torch.full_like(code, -1), self.order[:n].gather(1, gen))
        tok = torch.where(cfg.expand(code) == CLASS, self.cls[:rows, None].expand(-1, q), cfg.expand(tok))
        view = self.cache.view(0, rows)
        w = view.length.clone()
        lane = arange(q, dev)
        end = w[:, None] + cfg.expand(torch.where(lane[None, :] < prev[:, None], prev[:, None], fed[:, None]))  # [rows, q]
        mask = (arange(view.s_max, dev).view(1, 1, -1) < end[:, :, None]) & view.key_valid[:, None, :]
        logits = self.engine.step(view, tok, cfg.expand(pos), w, mask.unsqueeze(1))
        view.length += cfg.expand(prev)  # the previous block is committed; the queries' slots get group i's tokens
        j = arange(m, dev)
        at = cfg.expand((prev[:, None] + j).clamp(max=q - 1))  # feed index of each query of the group
        return self.commit_group(n, logits, at, first[:, None] + j - 1, first, size, m)

@register("lpd")
class LPDMethod(Method):
    """LPD: groups of tokens from position queries on the reference's group-size table."""

    Options = LPDOptions
    decoder_class = LPDDecoder
    help = "LPD parallel decoding with position queries, random order (LPD models)"
