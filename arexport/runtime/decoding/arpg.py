"""`arpg`: randomized parallel decoding with the multi-query step (ARPG).

Each image is generated in a random order of its grid cells. Step k feeds the tokens sampled at
step k-1 (the class token at step 0) with their positions, and asks n_k mask-token queries at the
next n_k positions of the order; all n_k tokens are sampled at once. The schedule fixes n_k:
after step k a fraction `ratio(k)` of the grid stays masked — `arccos`: arccos((k+1)/S)/(pi/2),
`cosine`: cos(pi/2 (k+1)/S) — clamped so every step makes at least one token and the last takes
the rest. Guidance is `constant` (g) or `linear` (1 + (g - 1) done / n_tokens). The output is put
back in raster order. Orders are per image (`order="row"`, batch-invariant) or one per batch
(`order="batch"`, as the reference samples them).
"""

from __future__ import annotations

import math

import torch

from arexport.errors import ArexportError
from arexport.runtime.decoding.base import CFGRows, DecodeResult, Method, register
from arexport.runtime.engine import Conditions
from arexport.runtime.sampling import SamplingParams, guided_logits, probs_from_logits, sample_from_probs

SCHEDULES = ("arccos", "cosine")
CFG_SCHEDULES = ("linear", "constant")


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


def guidance(params: SamplingParams, cfg_schedule: str, done: int, n_tokens: int) -> SamplingParams:
    """Sampling params with this step's CFG scale."""
    if cfg_schedule == "constant" or not params.uses_cfg:
        return params
    scale = 1.0 + (params.cfg_scale - 1.0) * done / n_tokens
    return SamplingParams(params.temperature, params.top_k, params.top_p, max(scale, 1.0 + 1e-6), -1)


@register("arpg")
class ARPGMethod(Method):
    """Random-order parallel decoding; `steps` forward passes per image."""

    def __init__(self, steps: int = 64, schedule: str = "arccos", cfg_schedule: str = "linear", order: str = "row"):
        if cfg_schedule not in CFG_SCHEDULES:
            raise ArexportError(f"arpg cfg schedule must be one of {', '.join(CFG_SCHEDULES)}, got {cfg_schedule!r}")
        if order not in ("row", "batch"):
            raise ArexportError(f"arpg order must be row or batch, got {order!r}")
        if schedule not in SCHEDULES:
            raise ArexportError(f"arpg schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        self.steps, self.schedule, self.cfg_schedule, self.order = steps, schedule, cfg_schedule, order

    def generate(self, engine, conds: Conditions, params, rng, progress=None, draft=None):
        spec = engine.spec
        if spec.family != "arpg":
            raise ArexportError(f"method arpg needs an ARPG model; {spec.name} is {spec.family}")
        dev = engine.device
        b, n_tok = len(conds), spec.n_tokens
        sizes = tokens_per_step(n_tok, min(self.steps, n_tok), self.schedule)
        if max(sizes) > engine.max_q:
            raise ArexportError(f"arpg step of {max(sizes)} tokens exceeds the engine's maximum {engine.max_q}: "
                                "use more steps or rebuild with a larger --verify-len")
        order = self._orders(rng, b, n_tok, dev)  # [B, N] grid positions in generation order
        cfg = CFGRows(params, b)
        cache = engine.allocate(cfg.rows)
        cls_rows = cfg.conditions(engine, conds).classes.long()
        feed = (cls_rows + spec.class_token_offset)[:, None]
        feed_pos = torch.full((cfg.rows, 1), -1, dtype=torch.long, device=dev)
        seq = torch.empty(b, n_tok, dtype=torch.long, device=dev)
        done = 0
        for n_k in sizes:
            w = cache.length.clone()
            n_in = feed.shape[1]
            qpos = cfg.expand(order[:, done:done + n_k])
            attn = cache.block_mask(w, n_in)
            qmask = attn[:, :, :1].expand(-1, -1, n_k, -1)  # every query sees what the first new token sees
            logits = engine.multi_query_step(cache, feed, feed_pos, w, attn, qpos, qmask)
            cache.length += n_in
            p = guidance(params, self.cfg_schedule, done, n_tok)
            probs = probs_from_logits(guided_logits(logits, p, True), p)
            new = sample_from_probs(probs, rng.uniform(n_k))
            seq[:, done:done + n_k] = new
            feed, feed_pos = cfg.expand(new), qpos
            done += n_k
            if progress:
                progress(b * n_k)
        raster = torch.empty_like(seq)
        raster.scatter_(1, order, seq)
        return DecodeResult(raster, {"forwards_per_row": [len(sizes)] * b,
                                     "accepted_lengths": [n for n in sizes for _ in range(b)]})

    def _orders(self, rng, b: int, n_tok: int, dev) -> torch.Tensor:
        """Random permutations from the rows' own random streams (row 0's for order='batch')."""
        keys = rng.uniform(n_tok)  # [B, N]
        if self.order == "batch":
            keys = keys[:1].expand(b, -1)
        return keys.argsort(dim=1)
