"""`nar`: NAR's next-neighbour decoding (ThisisBillhe/NAR `autoregressive/models/generate.py`).

A g x g grid is generated anti-diagonal by anti-diagonal (diagonal d: the cells with row + column = d,
top row first) in 2 g - 1 forwards. Forward 0 feeds the class token; cell (0, 0) is sampled from the
mean of its two heads. Forward i > 0 feeds diagonal i - 1 (n tokens, t_0 .. t_{n-1} from the top) and
samples diagonal i from the two heads' logits, R (right neighbour) and B (below):
* growing (i < g, n + 1 cells): R(t_0), (B(t_0) + R(t_1)) / 2, ..., (B(t_{n-2}) + R(t_{n-1})) / 2, B(t_{n-1});
* shrinking (i >= g, n - 1 cells): the n - 1 means only (the first and last would leave the grid).
The cache holds [class, diagonal 0, diagonal 1, ...] (generation order); each fed token sees every slot
up to the end of its own diagonal: the reference's proximity mask (RoPE carries the grid positions, so
the slot order does not matter to attention).

Guidance: constant scale on the combined logits (the reference's `cfg_scale`); `cfg_interval` as the
reference's: a diagonal is guided while the tokens generated before it are at most cfg_interval (-1:
always, its default). Images of one batch may be at different diagonals (continuous batching):
feeds are padded to the batch's longest, pads written past each row's diagonal, where nothing reads
them before the next forward overwrites them.
"""

from __future__ import annotations

import dataclasses

import torch

from arexport.errors import ArexportError
from arexport.families.nar import STEP_KIND, diagonal_order, diagonal_sizes
from arexport.runtime.kv_cache import arange
from arexport.runtime.methods.base import Method, Options, register
from arexport.runtime.methods.random_order import RandomOrderDecoder


def nar_schedule(grid: int) -> dict[str, torch.Tensor]:
    """Per forward i (2 g - 1 of them): `fed` tokens, the generation index of the first fed (`prev`, -1: the
    class), the cells produced (`size`) and the first's generation index (`first`), `shift` (1 when the
    diagonal shrinks: output k combines fed k and k + 1) and `cls` (1 for the class forward: output 0 is the
    mean of the class position's heads)."""
    sizes = diagonal_sizes(grid)
    firsts = [sum(sizes[:i]) for i in range(len(sizes))]
    rows = []
    for i, (f, m) in enumerate(zip(firsts, sizes)):
        fed, prev = (1, -1) if i == 0 else (sizes[i - 1], firsts[i - 1])
        rows.append((fed, prev, m, f, int(i >= grid), int(i == 0)))
    t = torch.tensor(rows)
    return dict(zip(("fed", "prev", "size", "first", "shift", "cls"), t.unbind(1)))


def combine_heads(right: torch.Tensor, below: torch.Tensor, fed: torch.Tensor, shift: torch.Tensor, cls: torch.Tensor,
                  m: int) -> torch.Tensor:
    """Logits of the next diagonal's cells [rows, m, V] from the heads [rows, q, V] of the fed diagonal (fed
    [rows] tokens; shift, cls [rows] as in nar_schedule): cell k reads R of fed j = k + shift and B of fed
    j - 1 (j for the class forward), their mean where both exist, the one that exists otherwise."""
    q = right.shape[1]
    j = arange(m, right.device)[None, :] + shift[:, None]
    bi = j - 1 + cls[:, None]
    r_ok, b_ok = (j < fed[:, None]), (bi >= 0) & (bi < fed[:, None])
    v = right.shape[-1]
    r = right.gather(1, j.clamp(0, q - 1)[..., None].expand(-1, -1, v))
    b = below.gather(1, bi.clamp(0, q - 1)[..., None].expand(-1, -1, v))
    return torch.where((r_ok & b_ok)[..., None], (b + r) / 2, torch.where(r_ok[..., None], r, b))


@dataclasses.dataclass(frozen=True)
class NAROptions(Options):
    pass


class NARDecoder(RandomOrderDecoder):
    def __init__(self, ctx, capacity):
        super().__init__(ctx, capacity, 2 if ctx.params.uses_cfg else 1)
        spec, s = self.spec, self.slots
        if STEP_KIND not in self.engine.step_kinds():
            raise ArexportError(f"method nar needs a NAR model (a {STEP_KIND} step); {spec.name} is a {spec.family} model")
        g = spec.grid_size
        if g > self.engine.max_q:
            raise ArexportError(f"nar feeds up to {g} tokens per forward (a diagonal of the {g} x {g} grid); the engine's "
                                f"maximum query length is {self.engine.max_q}: rebuild with --verify-len >= {g}")
        dev = s.device
        self.sched = {k: v.to(dev) for k, v in nar_schedule(g).items()}
        self.n_calls, self.width = 2 * g - 1, g
        self.cache = s.cache(self.engine.allocate(capacity * self.cfg.per_image, lookahead=g - 1))
        self.diag = diagonal_order(g).to(dev)  # grid position of each generation index (the same for every image)
        self.order = s.image_tensor((spec.n_tokens,))
        self.seq = s.image_tensor((spec.n_tokens + g,))  # tokens in generation order; the tail takes unused lanes
        self.c = s.image_tensor(())  # forwards done = the diagonal to produce next
        self.cls = s.row_tensor((), torch.int64)  # class token per row (null class on guidance rows)

    def sampling_of(self, p):
        if p.cfg_schedule != "constant":
            raise ArexportError(f"nar guides with a constant scale (the reference's cfg_scale), not cfg-schedule {p.cfg_schedule}")
        return p

    def start(self, a, b, conds):
        self.order[a:b] = self.diag
        r0, r1, cls = self.fresh_class_rows(a, b, conds)
        self.cls[r0:r1] = cls

    def advance(self):
        s, cfg, sc = self.slots, self.cfg, self.sched
        n, rows, dev = s.n, s.rows, s.device
        c = self.c[:n]
        fed, prev, size, first = sc["fed"][c], sc["prev"][c], sc["size"][c], sc["first"][c]
        q, m = int(fed.max()), int(size.max())
        gen = (prev[:, None] + arange(q, dev)).clamp(0, self.spec.n_tokens - 1)  # generation index of each fed entry
        is_cls = cfg.expand((prev < 0)[:, None].expand(-1, q))
        tok = torch.where(is_cls, self.cls[:rows, None].expand(-1, q), cfg.expand(self.seq[:n].gather(1, gen)))
        pos = torch.where(is_cls, torch.full_like(tok, -1), cfg.expand(self.diag[gen]))
        view = self.cache.view(0, rows)
        w = view.length.clone()
        end = w + cfg.expand(fed)  # every fed entry sees the slots up to the end of its own diagonal
        mask = (arange(view.s_max, dev)[None, :] < end[:, None]) & view.key_valid
        out = self.engine.run(STEP_KIND, view, tokens=tok, positions=pos, write_index=w,
                              attn_mask=mask[:, None, None, :].expand(-1, 1, q, -1))
        view.length.copy_(end)
        logits = combine_heads(out["logits"], out["logits_below"], cfg.expand(fed), cfg.expand(sc["shift"][c]),
                               cfg.expand(sc["cls"][c]), m)
        lane = arange(m, dev)
        # guidance index first + 1 for the whole diagonal: sampling's cfg_interval rule (index <= interval + 1) is then
        # the reference's (guided while the tokens generated before the diagonal are at most cfg_interval)
        guide = (first + 1)[:, None].expand(-1, m)
        return self.commit_group(n, logits, lane[None, :].expand(rows, -1), guide, first, size, m)


@register("nar")
class NARMethod(Method):
    """NAR: one anti-diagonal per forward from the right and below heads."""

    Options = NAROptions
    decoder_class = NARDecoder
    help = "NAR next-neighbour decoding, one anti-diagonal per forward (NAR models)"
