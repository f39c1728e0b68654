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

Every image has its own window length L_i = min(window, tokens left) (1 outside the interval); a
batch step feeds max L_i positions and shorter rows pad into their cache lookahead.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import torch

from arexport.errors import ArexportError
from arexport.runtime.methods.base import Decoder, Method, Options, option, register
from arexport.runtime.sampling import sample_from_probs
from arexport.runtime.speculative import StandardRule, WindowArms, per_row_lanes, verify_chain

INITS = ("random", "repeat_horizon")


@dataclass(frozen=True)
class SJDOptions(Options):
    window: Optional[int] = option(None, "Jacobi window L: tokens verified per step. Default: latency-aware, each step "
                                   "verifies the whole window (16, or the engine's largest verify block if smaller) "
                                   "or one token, whichever commits more tokens per second; a number pins it",
                                   flag="--window")
    init: str = option("random", "how new drafts are initialised", flag="--sjd-init", choices=INITS)
    start: int = option(0, "first token index where drafts may be accepted")
    end: Optional[int] = option(None, "token index where speculation stops (default: the last token)")

    def validate(self):
        if self.window is not None and self.window < 2:
            raise ArexportError(f"sjd window must be >= 2, got {self.window}")
        return self


class SJDDecoder(Decoder):
    def __init__(self, ctx, capacity: int, rule=None):
        super().__init__(ctx, capacity, 2 if ctx.params.uses_cfg else 1)
        o, spec = self.opts, self.spec
        self.rule = rule or StandardRule()
        limit = min(self.engine.max_q, spec.n_tokens)
        adaptive = o.window is None
        if adaptive:  # the default adapts to the engine; an explicit window that does not fit is an error
            o = dataclasses.replace(o, window=min(16, limit))
            self.opts = o
        if o.window > limit:
            raise ArexportError(f"sjd window {o.window} exceeds this engine's largest verify block of {limit} tokens: "
                                f"pass --window {limit} or less" + (" (or rebuild with a larger --verify-len)"
                                                                      if self.engine.max_q < spec.n_tokens else ""))
        self.window = o.window
        self.end = spec.n_tokens if o.end is None else min(o.end, spec.n_tokens)
        s, w, v = self.slots, self.window, spec.vocab_size
        self.cache = s.cache(self.engine.allocate(capacity * self.cfg.per_image, lookahead=w - 1))
        self.tokens = s.image_tensor((spec.n_tokens + w,))  # padded: no clamped writes
        self.n = s.image_tensor(())  # committed tokens per image
        self.drafts = s.image_tensor((w - 1,))
        self.q = s.image_tensor((w - 1, v), torch.float32)
        # latency-aware: the whole window or one token per step, priced by the engine's curve
        self.arms = WindowArms(self.engine.latency_curve(capacity * self.cfg.per_image, w), w) if adaptive else None

    def start(self, a, b, conds):
        s = self.slots
        logits = self.prefill(self.engine, self.cache, a, b, self.cfg.conditions(self.engine, conds))
        self.tokens[a:b, 0] = self.first_token(logits, a, b)
        self.n[a:b] = 1
        for st in s.stats[a:b]:
            st.forwards += 1
        zero = torch.zeros(b - a, dtype=torch.long, device=s.device)
        d, q = self._pad_drafts(self.tokens[a:b, 0], None, None, None, zero, self.n[a:b], s.uniform(self.window - 1, s.span(a, b))[a:b])
        self.drafts[a:b], self.q[a:b] = d, q

    def advance(self):
        t0 = time.perf_counter()
        s, spec, o = self.slots, self.spec, self.opts
        n_img, n_tok, dev = s.n, spec.n_tokens, s.device
        n = self.n[:n_img]
        remaining = n_tok - n
        spec_rows = (n >= o.start) & (n < self.end)
        arm = self.window if self.arms is None else self.arms.choose()
        window = remaining.clamp(max=arm)
        qlen = torch.where(spec_rows, window, torch.ones_like(n))  # per-image window
        Q = int(qlen.max())
        ar = torch.arange(Q, device=dev)
        last = self.tokens[:n_img].gather(1, (n - 1)[:, None])
        feed = torch.cat([last, self.drafts[:n_img, : Q - 1]], 1)
        pos = ((n - 1)[:, None] + ar).clamp(max=n_tok - 1)
        view = self.cache.view(0, s.rows)
        write = view.length.clone()
        out = self.engine.step(view, self.cfg.expand(feed), self.cfg.expand(pos), write, view.causal_mask(write, Q))
        tok_index = n[:, None] + ar  # token each output position predicts
        P = self.rule.target_probs(self.cfg.guide(out, tok_index), self.params)
        d_idx = tok_index[:, : Q - 1]
        allowed = (ar[: Q - 1] < (qlen - 1)[:, None]) & (d_idx < n_tok) & (d_idx >= o.start) & (d_idx < self.end)
        u, u_new = s.uniforms(2 * Q + 1, self.window - 1)  # this step's and the new drafts'
        u_acc, u_tok, u_fresh = per_row_lanes(u, qlen, Q)
        res = verify_chain(P, self.q[:n_img, : Q - 1], self.drafts[:n_img, : Q - 1], allowed, u_acc, u_tok, self.rule)
        k = res.accepted
        vals = torch.cat([self.drafts[:n_img, : Q - 1], res.token[:, None]], 1)
        vals.scatter_(1, k[:, None], res.token[:, None])
        keep = (ar[None, :] <= k[:, None]) & (tok_index < n_tok)
        toks = self.tokens[:n_img]
        toks.scatter_(1, tok_index, torch.where(keep, vals, toks.gather(1, tok_index)))
        adv = torch.minimum(k + 1, remaining)
        view.length += self.cfg.expand(adv)
        self.n[:n_img] += adv
        for st, a in zip(s.stats[:n_img], adv.tolist()):
            st.forwards += 1
            st.accepted.append(a)
        # next drafts: fresh samples from this step's p for the unverified tail, then new ones
        P = self.rule.bonus(P)  # what fresh drafts are drawn from (argmax under LANTERN's greedy variant)
        fresh = sample_from_probs(P, u_fresh)
        self.drafts[:n_img], self.q[:n_img] = self._pad_drafts(res.token, fresh, P, qlen, k + 1, self.n[:n_img], u_new)
        done = s.where(self.n[:n_img] >= n_tok)
        if self.arms is not None and Q == arm:  # a step cut short by the images' ends says little
            self.arms.observe(arm, float(adv.double().mean()), time.perf_counter() - t0)
        return done

    def finish(self, i):
        return self.finished(i, self.tokens[i, : self.spec.n_tokens].clone())

    def _pad_drafts(self, last, fresh, P, fresh_len, start, n, u):
        """Drafts for positions n .. n+L-2: fresh[:, start + i] where available (i.e. below each row's
        fresh_len), else new drafts from the uniforms u [B, L-1].

        last [B]: the newest committed token; fresh/P: this step's samples and distributions (None on
        the first call); start [B]: index in `fresh` of position n."""
        b, size, vocab, grid = last.shape[0], self.window - 1, self.spec.vocab_size, self.spec.grid_size
        dev = last.device
        idx = start[:, None] + torch.arange(size, device=dev)[None, :]
        if fresh is not None:
            have = idx < fresh_len[:, None]
            src = idx.clamp(max=fresh.shape[1] - 1)
            d = fresh.gather(1, src)
            q = P.gather(1, src[:, :, None].expand(b, size, vocab))
        else:
            have = torch.zeros(b, size, dtype=torch.bool, device=dev)
            d = torch.zeros(b, size, dtype=torch.long, device=dev)
            q = torch.zeros(b, size, vocab, dtype=torch.float32, device=dev)
        rand = (u * vocab).long().clamp(max=vocab - 1)
        if self.opts.init == "random":
            new = rand
        else:  # repeat_horizon: copy the previous token of the same image row
            new = torch.empty_like(rand)
            prev = last  # token at position n + i - 1
            for i in range(size):
                new[:, i] = torch.where((n + i) % grid == 0, rand[:, i], prev)
                prev = torch.where(have[:, i], d[:, i], new[:, i])
        d = torch.where(have, d, new)
        one_hot = torch.nn.functional.one_hot(new, vocab).to(q.dtype)
        q = torch.where(have[:, :, None], q, one_hot)
        return d, q


@register("sjd")
class SJD(Method):
    """Speculative Jacobi Decoding over the verify-block step."""

    Options = SJDOptions
    help = "Speculative Jacobi Decoding: verify a window of drafts per step, lossless"

    def decoder(self, ctx, capacity, rule=None):
        return SJDDecoder(ctx, capacity, rule)
