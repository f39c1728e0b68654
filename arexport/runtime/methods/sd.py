"""`sd`: draft-model speculative decoding — a small model sharing the tokenizer drafts, the target verifies.

Per round the draft model proposes g_i = min(gamma, tokens left - 1) tokens one at a time through
its own engine and cache (same sampling options, CFG included), the target scores
[pending, d_1 .. d_g] in one verify-block step, and `verify_chain` keeps a leading run plus one
resampled or bonus token. `pending` are committed tokens whose K/V the target has not computed yet:
the newest token, plus any tokens a skipped verification committed (VVS). Both caches hold every
committed token but the pending ones; each round starts the draft with a catch-up step that
(re)writes the two newest committed tokens (one in an image's first round), so the draft cache is
right after any outcome (rows that already had the older one recompute identical K/V).

Rows of one batch draft and verify different numbers of tokens: feeds are left-aligned and short
rows pad into their own cache lookahead; a row that sits out an engine call (it skips this round,
or has nothing left to draft) feeds padding there too, and its random stream does not advance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from arexport.errors import ArexportError
from arexport.runtime.methods.base import Decoder, Method, Options, option, register
from arexport.runtime.sampling import probs_from_logits, sample_from_probs
from arexport.runtime.speculative import DraftLength, StandardRule, verify_chain
from arexport.runtime.step_cost import prices


@dataclass(frozen=True)
class SDOptions(Options):
    gamma: Optional[int] = option(None, "draft tokens per round. Default: latency-aware, each image drafts 1 .. 8 "
                                  "(or what the engine's verify block holds), whatever maximises its expected committed "
                                  "tokens per unit of a fixed step-cost model (or of --latency-profile); a number pins it",
                                  flag="--gamma")

    def validate(self):
        if self.gamma is not None and self.gamma < 1:
            raise ArexportError(f"sd gamma must be >= 1, got {self.gamma}")
        return self


class SDDecoder(Decoder):
    """Draft-model speculative decoding; `skip` (VVS) may commit a round's drafts without the target."""

    def __init__(self, ctx, capacity: int, rule=None):
        super().__init__(ctx, capacity, 2 if ctx.params.uses_cfg else 1)
        self.draft = ctx.draft
        self.rule = rule or StandardRule()
        self.batch_sampling_keys = self.rule.batch_sampling_keys
        spec, s, rows = self.spec, self.slots, capacity * self.cfg.per_image
        limit = min(self.engine.max_q, spec.n_tokens) - 1
        adaptive = self.opts.gamma is None
        gamma = min(8, limit) if adaptive else self.opts.gamma  # a default adapts; an explicit value must fit
        if gamma > limit:
            raise ArexportError(f"gamma {gamma} drafts do not fit this engine's largest verify block of "
                                f"{limit + 1} tokens: pass --gamma {limit} or less")
        self.gamma = g = gamma
        # a verify block is pending + g <= min(max_q, 2g + 1) tokens: VVS never skips two rounds in a row, so at most one
        # skipped round's g drafts wait on top of the root (pending <= g + 1); short rows pad into their lookahead
        self.tcache = s.cache(self.engine.allocate(rows, lookahead=min(self.engine.max_q, 2 * g + 1) - 1))
        self.dcache = s.cache(self.draft.allocate(rows, lookahead=2))
        self.tokens = s.image_tensor((spec.n_tokens + 2 * g + 2,))  # padded: no clamped writes
        self.n = s.image_tensor(())  # committed tokens
        self.pending = s.image_tensor(())  # committed tokens without target K/V
        self.first = s.image_tensor((), torch.bool)  # no round yet: the draft has not seen token 0
        self.length = None
        if adaptive:  # a round with d drafts: the catch-up and d - 1 more draft steps, one target step of d + 1
            d = torch.arange(g + 1, dtype=torch.float64)
            pr = prices(self.engine, self.cfg.per_image, g + 1, self.draft)  # one image's rows; fixed, no clock
            drafting = torch.where(d > 0, pr.draft[1] + (d - 1).clamp(min=0) * pr.draft[0], 0.0)
            self.length = DraftLength(s, drafting + pr.target, 1, g, host=pr.host)

    def start(self, a, b, conds):
        s = self.slots
        rows = self.cfg.conditions(self.engine, conds)
        logits = self.prefill(self.engine, self.tcache, a, b, rows)
        self.prefill(self.draft, self.dcache, a, b, rows)
        self.tokens[a:b, 0] = self.first_token(logits, a, b)
        self.n[a:b], self.pending[a:b], self.first[a:b] = 1, 1, True
        for st in s.stats[a:b]:
            st.forwards += 1
            st.draft_forwards += 1

    # -- hooks for methods built on sd (VVS) -----------------------------------------------------------
    def skip(self, g: torch.Tensor, drafts, q) -> torch.Tensor:
        """[n] tokens each image commits without verification this round (0 = verify). SD never skips."""
        return torch.zeros_like(g)

    # -- one round -----------------------------------------------------------------------------------
    def advance(self):
        s, n_tok = self.slots, self.spec.n_tokens
        n = self.n[: s.n]
        remaining = n_tok - n
        # a verify block (pending + drafts) must fit the engine's largest query length
        cap = (remaining - 1).clamp(min=0, max=self.gamma)
        if self.length is not None:
            cap = self.length.choose(s.n, cap)
        g = torch.minimum(cap, self.engine.max_q - self.pending[: s.n]).clamp(min=0)
        drafts, q = self._draft(g)
        self.first[: s.n] = False
        m = self.skip(g, drafts, q)
        skipping = m > 0
        if bool(skipping.any()):
            self._commit_unverified(drafts, m, skipping)
        if not bool(skipping.all()):
            self._verify(drafts, q, g, ~skipping, remaining)
        return s.where(self.n[: s.n] >= n_tok)

    def _draft(self, g: torch.Tensor):
        """Per image g_i draft tokens from the draft model, and the distributions they came from."""
        s, spec, cfg, dev = self.slots, self.spec, self.cfg, self.slots.device
        b, G, n = s.n, int(g.max()), self.n[: s.n]
        drafts = torch.zeros(b, G, dtype=torch.long, device=dev)
        q = torch.zeros(b, G, spec.vocab_size, device=dev)
        if G == 0:
            return drafts, q
        drafting = g > 0
        view = self.dcache.view(0, s.rows)
        # catch-up: the c newest committed tokens (c = 1 in an image's first round, else 2), left-aligned
        c = torch.where(self.first[:b], 1, 2)
        C = int(c[drafting].max())
        j = torch.arange(C, device=dev)
        idx = (n - c)[:, None] + j
        feed = torch.where(j < c[:, None], self.tokens[:b].gather(1, idx.clamp(min=0)), 0)
        dlen = view.length[0::cfg.per_image]
        write = torch.where(drafting, (spec.cond_len + n - c).clamp(min=spec.cond_len), dlen)
        w = cfg.expand(write)
        out = self.draft.step(view, cfg.expand(feed), cfg.expand(idx.clamp(0, spec.n_tokens - 1)), w, view.causal_mask(w, C))
        # an idle image (g = 0) may have c = 2 where the drafting ones need C = 1: its row is never read
        out = out.gather(1, cfg.expand(c - 1).clamp(max=C - 1).view(-1, 1, 1).expand(-1, 1, out.shape[-1]))[:, 0]
        view.length.copy_(torch.where(cfg.expand(drafting), w + cfg.expand(c), view.length))
        self._count(drafting, draft=True)
        params = self.params
        for k in range(G):
            active = k < g
            t_index = (n + k).clamp(max=spec.n_tokens - 1)
            qk = probs_from_logits(cfg.guide(out, t_index, params), params)
            dk = sample_from_probs(qk, s.uniform(1, active)[:, 0])
            drafts[:, k], q[:, k] = dk, qk
            if k == G - 1:
                break
            feeding = k < g - 1
            w = view.length.clamp(max=view.s_max - 1)
            out = self.draft.step(view, cfg.expand(dk.view(-1, 1)), cfg.expand(t_index.view(-1, 1)), w, view.causal_mask(w, 1))[:, 0]
            view.length += cfg.expand(feeding.long())
            self._count(feeding, draft=True)
        return drafts, q

    def _verify(self, drafts, q, g, verifying, remaining):
        """One target forward over [pending, drafts] for the verifying images; commit each one's run + one token."""
        s, spec, cfg, dev = self.slots, self.spec, self.cfg, self.slots.device
        b, n_tok, G = s.n, spec.n_tokens, drafts.shape[1]
        n, p = self.n[:b], self.pending[:b]
        g = torch.where(verifying, g, 0)
        L = int((p + g)[verifying].max())
        j = torch.arange(L, device=dev)
        start = n - p  # token index of the first pending token
        toks = self.tokens[:b]
        from_tokens = toks.gather(1, (start[:, None] + j).clamp(max=toks.shape[1] - 1))
        from_drafts = drafts.gather(1, (j - p[:, None]).clamp(0, max(G - 1, 0))) if G else torch.zeros_like(from_tokens)
        feed = torch.where(j < p[:, None], from_tokens, torch.where(j < (p + g)[:, None], from_drafts, 0))
        pos = (start[:, None] + j).clamp(max=n_tok - 1)
        view = self.tcache.view(0, s.rows)
        write = view.length.clone()
        out = self.engine.step(view, cfg.expand(feed), cfg.expand(pos), write, view.causal_mask(write, L))
        ar = torch.arange(G + 1, device=dev)
        sel = cfg.expand((p - 1)[:, None] + ar).clamp(max=L - 1)  # outputs for the drafts and the bonus position
        out = out.gather(1, sel[:, :, None].expand(-1, -1, out.shape[-1]))
        tok_index = n[:, None] + ar
        params = self.params
        P = self.rule.target_probs(cfg.guide(out, tok_index, params), params)
        limit = torch.minimum(g, n_tok - n)  # drafts that may be accepted: those inside the image
        u = s.uniform(G + 1, verifying)
        res = verify_chain(P, q, drafts, limit, u[:, :G], u.gather(1, g[:, None])[:, 0], self.rule)
        k = res.accepted
        if self.length is not None:
            self.length.observe(g, k, verifying)
        vals = torch.cat([drafts, res.token[:, None]], 1)
        vals.scatter_(1, k[:, None], res.token[:, None])
        keep = (ar[None, :] <= k[:, None]) & verifying[:, None] & (tok_index < n_tok)
        toks.scatter_(1, tok_index, torch.where(keep, vals, toks.gather(1, tok_index)))
        adv = torch.where(verifying, torch.minimum(k + 1, remaining), 0)
        self.n[:b] += adv
        # the pending tokens and the accepted drafts now have K/V in the target cache
        view.length += cfg.expand(torch.where(verifying, p - 1 + adv, 0))
        self.pending[:b] = torch.where(verifying, 1, p)
        self._count(verifying, accepted=adv)

    def _commit_unverified(self, drafts, m, skipping):
        """Commit drafts without a target forward (VVS skip); they stay pending for the target."""
        b = self.slots.n
        M = int(m.max())
        idx = self.n[:b, None] + torch.arange(M, device=drafts.device)
        toks = self.tokens[:b]
        put = torch.arange(M, device=drafts.device)[None, :] < m[:, None]
        toks.scatter_(1, idx, torch.where(put, drafts[:, :M], toks.gather(1, idx)))
        self.n[:b] += m
        self.pending[:b] += m
        for st, skip, k in zip(self.slots.stats, skipping.tolist(), m.tolist()):
            if skip:
                st.skipped_rounds += 1
                st.accepted.append(k)

    def _count(self, rows: torch.Tensor, draft: bool = False, accepted=None) -> None:
        acc = accepted.tolist() if accepted is not None else None
        for i, (st, on) in enumerate(zip(self.slots.stats, rows.tolist())):
            if not on:
                continue
            if draft:
                st.draft_forwards += 1
            else:
                st.forwards += 1
                st.accepted.append(acc[i])

    def finish(self, i):
        return self.finished(i, self.tokens[i, : self.spec.n_tokens].clone())


@register("sd")
class SD(Method):
    """Draft-model speculative decoding (lossless with the standard rule)."""

    Options = SDOptions
    needs_draft = True
    help = "draft-model speculative decoding through a second engine"

    def decoder(self, ctx, capacity, rule=None):
        return SDDecoder(ctx, capacity, rule)
