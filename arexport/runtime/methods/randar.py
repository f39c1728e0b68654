"""`randar`: RandAR's random-order parallel decoding (ziqipang/RandAR `RandARTransformer.generate`).

Each image draws a random generation order of its grid cells (from its own random stream: the same
seed gives the same order whatever the batch). Forward c predicts group c of the schedule
(families.randar.randar_group_sizes: n_c tokens, cosine over `steps` forwards) from the outputs of the
group's position-instruction tokens. The cache holds [class, P_0, z_0, P_1, z_1, ...]: P_i (the
instruction for order[i]) at slot 1 + 2 i, its token z_i at 2 + 2 i. Forward 0 feeds [class, P_0];
forward c > 0 feeds, from slot 2 f + 2 (f: the previous group's first index, n its size), the previous
group interleaved with its own instructions [z_f, P_{f+1}, z_{f+1}, ..., z_{f+n-1}] followed by the
instructions of group c. The previous group's instructions after its first were written at the next
slots the forward before; the rewrite moves them into their pair slots. Attention is causal over the
slots, so a group's instructions see each other in order but none of the group's tokens.

Guidance (the reference's `cfg_scales` pair (start, end)): every token of group c is guided at the
scale of the group's first generation index f. `--cfg-schedule linear` with cfg-scale g ramps from
`--cfg-start` s (default 1, sample_c2i.py's 1.0,4.0) to g: s + (g - s) f / N; `constant` is g
throughout (the reference's start = end). As in the reference, an image is guided only when g > 1
(a start above 1 does not guide an image whose cfg-scale is 1).

Images of one batch may be at different forwards (continuous batching): feeds are padded to the
batch's longest, pads written past each row's fed slots, where nothing reads them before they are
rewritten.
"""

from __future__ import annotations

import dataclasses

import torch

from arexport.errors import ArexportError
from arexport.families.randar import DEFAULT_CFG_START, DEFAULT_STEPS, randar_cfg_scale, randar_feed_len, randar_group_sizes
from arexport.runtime.methods.base import Method, Options, option, register
from arexport.runtime.methods.random_order import RandomOrderDecoder, generation_order
from arexport.runtime.sampling import MAX_CFG_SCALE, cfg_combine, per_group

CLASS = -1  # feed code of the class token; -2 - i: the instruction for generation index i; >= 0: token i


def randar_feeds(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feed codes [C, F] (pads repeat the last entry), feed lengths [C] and each group's first
    generation index [C] for a schedule of C groups."""
    firsts = [sum(sizes[:c]) for c in range(len(sizes))]
    feeds = [[CLASS, -2]]
    for c in range(1, len(sizes)):
        f, n = firsts[c - 1], sizes[c - 1]
        row = [f]
        for j in range(1, n):
            row += [-2 - (f + j), f + j]
        feeds.append(row + [-2 - i for i in range(firsts[c], firsts[c] + sizes[c])])
    width = randar_feed_len(sizes)
    lengths = [len(r) for r in feeds]
    return (torch.tensor([r + r[-1:] * (width - len(r)) for r in feeds]), torch.tensor(lengths), torch.tensor(firsts))


@dataclasses.dataclass(frozen=True)
class RandAROptions(Options):
    steps: int = option(DEFAULT_STEPS, "forwards per image (RandAR's num_inference_steps; -1: one token per forward)",
                        flag="--steps")
    cfg_start: float = option(DEFAULT_CFG_START, "guidance scale at the first token of the linear schedule, which ramps "
                              "to --cfg-scale (RandAR's --cfg-scales START,END; START = END is a constant scale)",
                              flag="--cfg-start")

    def validate(self):
        if not 0.0 <= self.cfg_start <= MAX_CFG_SCALE:
            raise ArexportError(f"randar cfg-start must be in [0, {MAX_CFG_SCALE:g}], got {self.cfg_start:g}")
        return self


class RandARDecoder(RandomOrderDecoder):
    def __init__(self, ctx, capacity):
        super().__init__(ctx, capacity, 2 if ctx.params.uses_cfg else 1)
        spec, s = self.spec, self.slots
        fam = self.engine.family
        if not hasattr(fam, "instruction_token"):
            raise ArexportError(f"method randar needs a RandAR model; {spec.name} is a {spec.family} model")
        sizes = randar_group_sizes(spec.n_tokens, self.opts.steps)
        width = randar_feed_len(sizes)
        if width > self.engine.max_q:
            raise ArexportError(f"randar with {self.opts.steps} steps feeds up to {width} tokens per forward; the engine's "
                                f"maximum query length is {self.engine.max_q}: use more steps or rebuild with --verify-len >= {width}")
        dev = s.device
        feeds, lengths, firsts = randar_feeds(sizes)
        self.feeds, self.lengths, self.firsts = feeds.to(dev), lengths.to(dev), firsts.to(dev)
        self.sizes = torch.tensor(sizes, device=dev)
        self.n_calls, self.width = len(sizes), max(sizes)
        self.instr = fam.instruction_token(spec)
        # slots: class + N instructions + N tokens, plus one padded feed
        self.cache = s.cache(self.engine.allocate(capacity * self.cfg.per_image, lookahead=spec.n_tokens + width - 1))
        self.order = s.image_tensor((spec.n_tokens,))  # grid positions in generation order
        self.seq = s.image_tensor((spec.n_tokens + self.width,))  # tokens in generation order; the tail takes unused lanes
        self.c = s.image_tensor(())  # next forward
        self.cls = s.row_tensor((), torch.int64)  # class token per row (null class on guidance rows)

    def sampling_of(self, p):
        if p.cfg_schedule not in ("constant", "linear"):  # guided at f - 1 = -1 for the first group (see module doc)
            raise ArexportError(f"randar guides with a constant scale or RandAR's linear ramp (cfg-schedule linear), "
                                f"not cfg-schedule {p.cfg_schedule}")
        if p.cfg_schedule == "constant" and self.opts.cfg_start != DEFAULT_CFG_START:
            raise ArexportError(f"randar cfg-start {self.opts.cfg_start:g} is the linear schedule's first scale; "
                                f"cfg-schedule constant guides at cfg-scale {p.cfg_scale:g} throughout")
        if p.cfg_interval >= 0:
            raise ArexportError(f"randar guides every group (the reference has no cfg-interval), got cfg-interval {p.cfg_interval}")
        return p

    def guide_group(self, logits, guide_index):
        """Guided logits [n, m, V] for groups whose tokens have guide_index = f - 1 (f: the group's first
        generation index): the reference's scale s + (g - s) f / N under `linear`, g under `constant`."""
        if self.cfg.per_image == 1:
            return logits
        n_tok, start = self.spec.n_tokens, self.opts.cfg_start

        def guide(p, cond, uncond, index):
            if p.cfg_schedule == "constant":
                return cfg_combine(cond, uncond, p.cfg_scale)
            return cfg_combine(cond, uncond, randar_cfg_scale(start, p.cfg_scale, index + 1, n_tok)[..., None])

        return per_group(self.params, guide, logits[0::2], logits[1::2], guide_index)

    def start(self, a, b, conds):
        s = self.slots
        self.order[a:b] = generation_order(s.uniform(self.spec.n_tokens, s.span(a, b))[a:b])
        r0, r1, cls = self.fresh_class_rows(a, b, conds)
        self.cls[r0:r1] = cls

    def advance(self):
        s, cfg = self.slots, self.cfg
        n, rows, dev = s.n, s.rows, s.device
        c = self.c[:n]
        fed, size, first = self.lengths[c], self.sizes[c], self.firsts[c]
        q, m = int(fed.max()), int(size.max())
        code = self.feeds[c][:, :q]  # [n, q]
        gen = torch.where(code >= 0, code, -2 - code).clamp(min=0)  # generation index of each fed entry
        tok = torch.where(code >= 0, self.seq[:n].gather(1, gen), torch.full_like(code, self.instr))
        pos = torch.where(code == CLASS, torch.full_like(code, -1), self.order[:n].gather(1, gen))
        tok = torch.where(cfg.expand(code) == CLASS, self.cls[:rows, None].expand(-1, q), cfg.expand(tok))
        view = self.cache.view(0, rows)
        w = view.length.clone()
        logits = self.engine.step(view, tok, cfg.expand(pos), w, view.causal_mask(w, q))
        view.length.copy_(cfg.expand(2 * first + 2))  # up to and including the next group's first instruction
        lane = torch.arange(m, device=dev)
        at = (fed - size)[:, None] + lane  # feed index of each instruction of the group
        at = cfg.expand(at.clamp(max=q - 1))
        return self.commit_group(n, logits, at, (first - 1)[:, None].expand(-1, m), first, size, m)

@register("randar")
class RandARMethod(Method):
    """RandAR: random order, a cosine schedule of token groups over `steps` forwards."""

    Options = RandAROptions
    decoder_class = RandARDecoder
    help = "RandAR random-order parallel decoding with position-instruction tokens (RandAR models)"
