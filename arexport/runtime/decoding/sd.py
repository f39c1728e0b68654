"""`sd`: draft-model speculative decoding — a small model sharing the tokenizer drafts, the target verifies.

Per round the draft model proposes `gamma` tokens one at a time through its own engine and cache
(same sampling options, CFG included), the target scores [pending, d_1 .. d_gamma] in one
verify-block step, and `verify_chain` keeps a leading run plus one resampled or bonus token.
`pending` are committed tokens whose K/V the target has not computed yet: the newest token, plus
any tokens a skipped verification committed (VVS). Both caches hold every committed token but the
pending ones; each round starts the draft with a 2-token catch-up step that (re)writes the two
newest committed tokens, so the draft cache is right after any outcome (rows that already had the
older one recompute identical K/V).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from arexport.errors import ArexportError
from arexport.runtime.decoding.base import CFGRows, DecodeResult, Method, register
from arexport.runtime.sampling import probs_from_logits, sample_from_probs
from arexport.runtime.speculative import StandardRule, verify_chain


def check_draft(target, draft) -> None:
    """The draft must share the target's tokenizer, grid and condition space."""
    if draft is None:
        raise ArexportError("this method needs a draft model: pass --draft NAME|DIR")
    t, d = target.spec, draft.spec
    for field in ("vocab_size", "n_tokens", "model_type", "num_classes", "cond_len", "caption_dim"):
        if getattr(t, field) != getattr(d, field):
            raise ArexportError(f"draft {d.name} does not match target {t.name}: {field} {getattr(d, field)} != {getattr(t, field)}")


@register("sd")
class SD(Method):
    """Draft-model speculative decoding (lossless with the standard rule)."""

    needs_draft = True

    def __init__(self, gamma: int = 4, rule=None):
        if gamma < 1:
            raise ArexportError(f"sd gamma must be >= 1, got {gamma}")
        self.gamma = gamma
        self.rule = rule or StandardRule()

    # -- hooks for methods built on sd (VVS) -----------------------------------------------------------
    def start(self, st: SimpleNamespace) -> None:
        """Called once before the first round."""

    def skip_size(self, st: SimpleNamespace, drafts, q) -> int:
        """Tokens to commit without verification this round (0 = verify). SD never skips."""
        return 0

    # -- the loop ------------------------------------------------------------------------------------
    def generate(self, engine, conds, params, rng, progress=None, draft=None):
        check_draft(engine, draft)
        spec = engine.spec
        dev = engine.device
        b, n_tok = len(conds), spec.n_tokens
        gamma = min(self.gamma, engine.max_q - 1, n_tok - 1)
        cfg = CFGRows(params, b)
        rows_conds = cfg.conditions(engine, conds)
        tcache, dcache = engine.allocate(cfg.rows), draft.allocate(cfg.rows)
        logits = engine.prefill(tcache, rows_conds)
        draft.prefill(dcache, rows_conds.to(draft.device))
        tokens = torch.zeros(b, n_tok + 2 * gamma + 2, dtype=torch.long, device=dev)  # padded: no clamped writes
        p0 = probs_from_logits(cfg.guide(logits, params.cfg_active(0)), params)
        tokens[:, 0] = sample_from_probs(p0, rng.uniform(1)[:, 0])
        st = SimpleNamespace(engine=engine, draft=draft, spec=spec, cfg=cfg, params=params, rng=rng, tokens=tokens,
                             n=torch.ones(b, dtype=torch.long, device=dev), pending=1, tcache=tcache, dcache=dcache,
                             accepted=[], row_steps=torch.ones(b, dtype=torch.long, device=dev), first_round=True,
                             rounds=0, skipped_rounds=0, last_skipped=False,
                             decisions=[])  # per-round skip decisions, filled by VVS
        if progress:
            progress(b)
        self.start(st)
        while bool((st.n < n_tok).any()):
            live = st.n < n_tok
            remaining = torch.where(live, n_tok - st.n, torch.zeros_like(st.n))
            room = torch.where(live, spec.s_max - tcache.length[:b], torch.full_like(st.n, spec.s_max))
            g = int(min(gamma, int(remaining.max()) - 1, int(room.min()) - st.pending))
            drafts, q = self._draft(st, g)
            st.first_round = False
            st.rounds += 1
            m = self.skip_size(st, drafts, q) if g > 0 else 0
            if m > 0:
                adv = self._commit_unverified(st, drafts[:, :m], live)
            else:
                adv = self._verify(st, drafts, q, g, live, remaining)
            st.last_skipped = m > 0
            if progress:
                progress(int(adv.sum()))
        return DecodeResult(tokens[:, :n_tok].contiguous(), {
            "accepted_lengths": st.accepted, "forwards_per_row": st.row_steps.tolist(),
            "skipped_rounds": st.skipped_rounds}, extras={"decisions": st.decisions})

    def _verify(self, st, drafts, q, g, live, remaining):
        """One target forward over [pending, drafts]; commit the accepted run + one token."""
        spec, cfg, n_tok, p = st.spec, st.cfg, st.spec.n_tokens, st.pending
        n, tokens = st.n, st.tokens
        ar = torch.arange(p + g, device=n.device)
        start = n - p  # token index of the first pending token
        feed = torch.cat([tokens.gather(1, start[:, None] + ar[:p]), drafts], 1)
        pos = (start[:, None] + ar).clamp(max=n_tok - 1)
        write = st.tcache.length.clamp(max=spec.s_max - (p + g))  # only finished rows are clamped
        out = st.engine.step(st.tcache, cfg.expand(feed), cfg.expand(pos), write, st.tcache.causal_mask(write, p + g))
        out = out[:, p - 1:]  # distributions for the g drafts and the bonus position
        tok_index = n[:, None] + ar[: g + 1]
        P = probs_from_logits(cfg.guide(out, cfg.active(tok_index)), st.params)
        allowed = live[:, None] & (tok_index[:, :g] < n_tok)
        u = st.rng.uniform(g + 1)
        res = verify_chain(P, q, drafts, allowed, u[:, :g], u[:, g], self.rule)
        k = res.accepted
        vals = torch.cat([drafts, res.token[:, None]], 1)
        vals.scatter_(1, k[:, None], res.token[:, None])
        keep = (ar[: g + 1][None, :] <= k[:, None]) & live[:, None] & (tok_index < n_tok)
        tokens.scatter_(1, tok_index, torch.where(keep, vals, tokens.gather(1, tok_index)))
        adv = torch.where(live, torch.minimum(k + 1, remaining), torch.zeros_like(k))
        st.n = n + adv
        # the pending tokens and the accepted drafts now have K/V in the target cache
        st.tcache.length += cfg.expand(torch.where(live, p - 1 + adv, torch.zeros_like(adv)))
        st.pending = 1
        st.accepted += adv[live].tolist()
        st.row_steps += live.long()
        return adv

    def _commit_unverified(self, st, chosen, live):
        """Commit drafts without a target forward (VVS skip); they stay pending for the target."""
        m = chosen.shape[1]
        idx = st.n[:, None] + torch.arange(m, device=st.n.device)
        cur = st.tokens.gather(1, idx)
        st.tokens.scatter_(1, idx, torch.where(live[:, None], chosen, cur))
        adv = torch.where(live, torch.full_like(st.n, m), torch.zeros_like(st.n))
        st.n = st.n + adv
        st.pending += m
        st.skipped_rounds += 1
        st.accepted += adv[live].tolist()
        return adv

    def _draft(self, st, g):
        """g draft tokens per row from the draft model, and the distributions they came from."""
        draft, dcache, spec, cfg = st.draft, st.dcache, st.spec, st.cfg
        b = st.n.shape[0]
        dev = draft.device
        n_tok = spec.n_tokens
        drafts = torch.zeros(b, g, dtype=torch.long, device=dev)
        q = torch.zeros(b, g, spec.vocab_size, device=dev)
        if g == 0:
            return drafts, q
        # Catch-up step: the two newest committed tokens (one in the first round). The draft cache
        # holds every committed token except the newest (or the two newest after a full accept).
        c = 1 if st.first_round else 2
        n = st.n.to(dev)
        idx = (n[:, None] - c + torch.arange(c, device=dev)).clamp(min=0)
        feed = st.tokens.gather(1, idx.to(st.tokens.device)).to(dev)
        write = (spec.cond_len + n - c).clamp(min=spec.cond_len, max=spec.s_max - c)
        write = cfg.expand(write)
        out = draft.step(dcache, cfg.expand(feed), cfg.expand(idx.clamp(max=n_tok - 1)), write, dcache.causal_mask(write, c))[:, -1]
        dcache.length.copy_(write + c)
        for j in range(g):
            t_index = (n + j).clamp(max=n_tok - 1)
            qj = probs_from_logits(cfg.guide(out, cfg.active(t_index)), st.params)
            dj = sample_from_probs(qj, st.rng.uniform(1)[:, 0])
            drafts[:, j], q[:, j] = dj, qj
            if j == g - 1:
                break
            write = dcache.length.clamp(max=spec.s_max - 1)
            out = draft.step(dcache, cfg.expand(dj.view(-1, 1)), cfg.expand(t_index.view(-1, 1)), write, dcache.causal_mask(write, 1))[:, 0]
            dcache.length += 1
        return drafts, q
