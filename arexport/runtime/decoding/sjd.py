"""`sjd`: Speculative Jacobi Decoding — training-free, lossless, one verify-block step per iteration.

Each iteration feeds the window [last, d_1 .. d_{L-1}] (last = newest committed token, d = drafts
for the next positions with the distributions q they were drawn from). The step's logits give the
target p for every window position; `verify_chain` accepts a leading run of drafts and adds one
resampled (or bonus) token. The cache keeps the KV of `last` and the accepted drafts — the rest of
the window lies past the row's length and is simply overwritten next time (no rollback). Fresh
samples from p at the unverified tail become the next drafts (their q is this step's p); the window
is padded with new drafts: `random` (uniform token, one-hot q) or `repeat_horizon` (repeat the
previous token of the same image row, one-hot q; random at a row start).
Outside the token interval [start, end) no draft is accepted, i.e. decoding is plain AR.
"""

from __future__ import annotations

from typing import Optional

import torch

from arexport.errors import ArexportError
from arexport.runtime.decoding.base import CFGRows, DecodeResult, Method, register
from arexport.runtime.sampling import probs_from_logits, sample_from_probs
from arexport.runtime.speculative import StandardRule, verify_chain

INITS = ("random", "repeat_horizon")


@register("sjd")
class SJD(Method):
    """Speculative Jacobi Decoding over the verify-block step."""

    def __init__(self, window: int = 16, init: str = "random", start: int = 0, end: Optional[int] = None, rule=None):
        if window < 2:
            raise ArexportError(f"sjd window must be >= 2, got {window}")
        if init not in INITS:
            raise ArexportError(f"sjd init must be one of {', '.join(INITS)}, got {init!r}")
        self.window, self.init, self.start, self.end = window, init, start, end
        self.rule = rule or StandardRule()

    def generate(self, engine, conds, params, rng, progress=None, draft=None):
        spec = engine.spec
        dev = engine.device
        b, n_tok, vocab = len(conds), spec.n_tokens, spec.vocab_size
        window = min(self.window, engine.max_q, n_tok)
        end = n_tok if self.end is None else min(self.end, n_tok)
        cfg = CFGRows(params, b)
        cache = engine.allocate(cfg.rows)
        logits = engine.prefill(cache, cfg.conditions(engine, conds))
        tokens = torch.zeros(b, n_tok + window, dtype=torch.long, device=dev)  # padded: no clamped writes
        p0 = probs_from_logits(cfg.guide(logits, params.cfg_active(0)), params)
        tokens[:, 0] = sample_from_probs(p0, rng.uniform(1)[:, 0])
        n = torch.ones(b, dtype=torch.long, device=dev)  # committed tokens per row
        if progress:
            progress(b)
        drafts, q = self._pad_drafts(tokens[:, 0], None, None, torch.zeros(b, dtype=torch.long, device=dev), n, window - 1,
                                     vocab, spec.grid_size, rng, p0.dtype)
        arange = torch.arange(window, device=dev)
        accepted_lengths: list[int] = []
        row_steps = torch.ones(b, dtype=torch.long, device=dev)  # the prefill
        while bool((n < n_tok).any()):
            live = n < n_tok
            remaining = torch.where(live, n_tok - n, torch.zeros_like(n))
            spec_rows = live & (n >= self.start) & (n < end)
            # A live row's window must fit in its cache (rows near the end shrink everyone's window).
            room = torch.where(live, spec.s_max - cache.length[:b], torch.full_like(n, spec.s_max))
            qlen = int(min(window, int(remaining.max()), int(room.min()))) if bool(spec_rows.any()) else 1
            last = tokens.gather(1, (n - 1)[:, None])
            feed = torch.cat([last, drafts[:, : qlen - 1]], 1)
            pos = ((n - 1)[:, None] + arange[:qlen]).clamp(max=n_tok - 1)
            write = cache.length.clamp(max=spec.s_max - qlen)  # only finished rows are clamped (garbage)
            out = engine.step(cache, cfg.expand(feed), cfg.expand(pos), write, cache.causal_mask(write, qlen))
            tok_index = n[:, None] + arange[:qlen]  # token each output position predicts
            P = probs_from_logits(cfg.guide(out, cfg.active(tok_index)), params)
            d_idx = tok_index[:, : qlen - 1]
            allowed = live[:, None] & (d_idx < n_tok) & (d_idx >= self.start) & (d_idx < end)
            u = rng.uniform(2 * qlen + 1)
            res = verify_chain(P, q[:, : qlen - 1], drafts[:, : qlen - 1], allowed, u[:, :qlen - 1], u[:, qlen - 1], self.rule)
            k = res.accepted
            # commit accepted drafts and the resampled/bonus token at index k
            vals = torch.cat([drafts[:, : qlen - 1], res.token[:, None]], 1)
            vals.scatter_(1, k[:, None], res.token[:, None])
            keep = (arange[:qlen][None, :] <= k[:, None]) & live[:, None] & (tok_index < n_tok)
            tokens.scatter_(1, tok_index, torch.where(keep, vals, tokens.gather(1, tok_index)))
            adv = torch.where(live, torch.minimum(k + 1, remaining), torch.zeros_like(k))
            cache.length += cfg.expand(adv)
            n = n + adv
            accepted_lengths += adv[live].tolist()
            row_steps += live.long()
            if progress:
                progress(int(adv.sum()))
            # next drafts: fresh samples from this step's p for the unverified tail, then new ones
            fresh = sample_from_probs(P, u[:, qlen:2 * qlen])
            drafts, q = self._pad_drafts(res.token, fresh, P, k + 1, n, window - 1, vocab, spec.grid_size, rng, P.dtype)
        return DecodeResult(tokens[:, :n_tok].contiguous(), {"accepted_lengths": accepted_lengths, "forwards_per_row": row_steps.tolist()})

    def _pad_drafts(self, last, fresh, P, start, n, size, vocab, grid, rng, dtype):
        """Drafts for positions n .. n+size-1: fresh[:, start + i] where available, else new drafts.

        last [B]: the newest committed token; fresh/P: this step's samples and distributions
        (None on the first call); start [B]: index in `fresh` of position n.
        """
        b = last.shape[0]
        dev = last.device
        idx = start[:, None] + torch.arange(size, device=dev)[None, :]
        if fresh is not None:
            have = idx < fresh.shape[1]
            src = idx.clamp(max=fresh.shape[1] - 1)
            d = fresh.gather(1, src)
            q = P.gather(1, src[:, :, None].expand(b, size, vocab))
        else:
            have = torch.zeros(b, size, dtype=torch.bool, device=dev)
            d = torch.zeros(b, size, dtype=torch.long, device=dev)
            q = torch.zeros(b, size, vocab, dtype=dtype, device=dev)
        rand = (rng.uniform(size) * vocab).long().clamp(max=vocab - 1)
        if self.init == "random":
            new = rand
        else:  # repeat_horizon: copy the previous token of the same image row
            new = torch.empty_like(rand)
            prev = last  # token at position n + i - 1
            for i in range(size):
                new[:, i] = torch.where((n + i) % grid == 0, rand[:, i], prev)
                prev = torch.where(have[:, i], d[:, i], new[:, i])
        d = torch.where(have, d, new)
        one_hot = torch.nn.functional.one_hot(new, vocab).to(dtype)
        q = torch.where(have[:, :, None], q, one_hot)
        return d, q
