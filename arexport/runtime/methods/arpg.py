"""`arpg`: randomized parallel decoding with the multi-query step (ARPG).

Each image is generated in a random order of its grid cells. Step k feeds the tokens sampled at
step k-1 (the class token at step 0) with their positions, and asks n_k mask-token queries at the
next n_k positions of the order; all n_k tokens are sampled at once. The schedule fixes n_k:
after step k a fraction `ratio(k)` of the grid stays masked — `arccos`: arccos((k+1)/S)/(pi/2),
`cosine`: cos(pi/2 (k+1)/S) — clamped so every step makes at least one token and the last takes
the rest. The guidance scale follows the sampler's `cfg_schedule` (ARPG models default to `linear`,
1 + (g - 1) done / n_tokens), evaluated once per step where `done` counts the tokens predicted so far
*including this step's*, as the official `generate` does (the index of the step's last token).
`cfg_interval` counts the same index: a step is guided while it is <= cfg_interval + 1 (the shared
guidance rule, sampling.guided_logits; before issue 28 ARPG ignored cfg_interval). The
output is put back in raster order. Orders are per image (`order=row`, batch-invariant) or shared by the images
admitted together (`order=batch`, as the reference samples one order per batch).

Images of one batch may sit at different steps (continuous batching): the new tokens and the
queries are padded to the batch's largest counts; pads are written into each row's lookahead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from arexport.errors import ArexportError
from arexport.runtime.methods.base import Decoder, Method, Options, option, register
from arexport.runtime.sampling import probs_from_logits, sample_from_probs

SCHEDULES = ("arccos", "cosine")


def tokens_per_step(n_tokens: int, steps: int, schedule: str = "arccos") -> list[int]:
    """How many tokens each of `steps` steps generates; sums to n_tokens, each >= 1."""
    if schedule not in SCHEDULES:
        raise ArexportError(f"arpg schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not 1 <= steps <= n_tokens:
        raise ArexportError(f"arpg steps must be in [1, {n_tokens}] for {n_tokens} tokens, got {steps}")
    out, remaining = [], n_tokens
    for k in range(steps):
        if k == steps - 1:
            out.append(remaining)
            break
        if schedule == "arccos":
            ratio = math.acos((k + 1) / steps) / (math.pi / 2)
        else:
            ratio = math.cos(math.pi / 2 * (k + 1) / steps)
        masked_after = min(max(int(n_tokens * ratio), steps - k - 1), remaining - 1)
        out.append(remaining - masked_after)
        remaining = masked_after
    return out


@dataclass(frozen=True)
class ARPGOptions(Options):
    steps: Optional[int] = option(None, "parallel decoding steps (default 64, or one per token on grids of fewer tokens)",
                                  flag="--steps")
    schedule: str = option("arccos", "tokens-per-step schedule", flag="--schedule", choices=SCHEDULES)
    order: str = option("row", "random order per image (row: results independent of batching) or one per batch of "
                        "images admitted together (batch: the official behaviour)", flag="--order", choices=("row", "batch"))


class ARPGDecoder(Decoder):
    def __init__(self, ctx, capacity):
        super().__init__(ctx, capacity, 2 if ctx.params.uses_cfg else 1)
        spec, s, o = self.spec, self.slots, self.opts
        n_tok = spec.n_tokens
        steps = min(64, n_tok) if o.steps is None else o.steps  # more steps than tokens is an error, not a clamp
        self.sizes = tokens_per_step(n_tok, steps, o.schedule)
        if max(self.sizes) > self.engine.max_q:
            raise ArexportError(f"arpg step of {max(self.sizes)} tokens exceeds the engine's maximum {self.engine.max_q}: "
                                "use more steps or rebuild with a larger --verify-len")
        dev = s.device
        self.size_of = torch.tensor(self.sizes + [0], device=dev)
        self.start_of = torch.tensor([sum(self.sizes[:k]) for k in range(len(self.sizes) + 1)], device=dev)
        big = max(self.sizes)
        # a row pads its feed up to the batch's largest; that fits past its own tokens when the
        # schedule ends with its largest step (arccos and cosine do), else it needs lookahead slots
        self.cache = s.cache(self.engine.allocate(capacity * self.cfg.per_image, lookahead=max(0, big - self.sizes[-1])))
        self.order = s.image_tensor((n_tok,))  # grid positions in generation order
        self.seq = s.image_tensor((n_tok,))
        self.k = s.image_tensor(())  # next step
        self.feed = s.row_tensor((big,), torch.int64)  # tokens to feed at the next step, per row
        self.feed_pos = s.row_tensor((big,), torch.int64)

    def start(self, a, b, conds):
        s, spec = self.slots, self.spec
        keys = s.uniform(spec.n_tokens, s.span(a, b))[a:b]
        if self.opts.order == "batch":  # one order for the images admitted together
            keys = keys[:1].expand(b - a, -1)
        self.order[a:b] = keys.argsort(dim=1)
        r0, r1, cls = self.fresh_class_rows(a, b, conds)
        self.feed[r0:r1, 0] = cls
        self.feed_pos[r0:r1, 0] = -1

    def advance(self):
        s, spec, cfg = self.slots, self.spec, self.cfg
        n, rows = s.n, s.rows
        k = self.k[:n]
        n_in = torch.where(k == 0, 1, self.size_of[(k - 1).clamp(min=0)])
        n_q, first = self.size_of[k], self.start_of[k]
        N, M = int(n_in.max()), int(n_q.max())
        view = self.cache.view(0, rows)
        w = view.length.clone()
        attn = view.block_mask(w, N, fed=cfg.expand(n_in))
        qidx = (first[:, None] + torch.arange(M, device=s.device)).clamp(max=spec.n_tokens - 1)
        qpos = cfg.expand(self.order[:n].gather(1, qidx))
        qmask = attn[:, :, :1].expand(-1, -1, M, -1)
        logits = self.engine.multi_query_step(view, self.feed[:rows, :N], self.feed_pos[:rows, :N], w, attn, qpos, qmask)
        view.length += cfg.expand(n_in)
        params = self.params
        # each image at its own point of its guidance schedule and interval: the index of the step's
        # last token (tokens predicted so far, this step's included, as ARPG's generate counts them)
        logits = cfg.guide(logits, first + n_q - 1, params)
        new = sample_from_probs(probs_from_logits(logits, params), s.uniform(M))
        keep = torch.arange(M, device=s.device)[None, :] < n_q[:, None]
        self.seq[:n].scatter_(1, qidx, torch.where(keep, new, self.seq[:n].gather(1, qidx)))
        self.feed[:rows, :M], self.feed_pos[:rows, :M] = cfg.expand(new), qpos
        self.k[:n] += 1
        for st, m in zip(s.stats[:n], n_q.tolist()):
            st.forwards += 1
            st.accepted.append(m)
        return s.where(self.k[:n] == len(self.sizes))

    def finish(self, i):
        raster = torch.empty_like(self.seq[i])
        raster[self.order[i]] = self.seq[i]
        return self.finished(i, raster)


@register("arpg")
class ARPGMethod(Method):
    """Random-order parallel decoding; `steps` forward passes per image."""

    Options = ARPGOptions
    decoder_class = ARPGDecoder
    help = "ARPG random-order parallel decoding with the multi-query step"
