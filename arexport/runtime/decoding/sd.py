"""`sd`: draft-model speculative decoding — a small model sharing the tokenizer drafts, the target verifies.

Per round the draft model proposes `gamma` tokens one at a time through its own engine and cache
(same sampling options, CFG included), the target scores [last, d_1 .. d_gamma] in one verify-block
step, and `verify_chain` keeps a leading run plus one resampled or bonus token. Both caches hold
every committed token but the newest; after a round in which all drafts were accepted the draft
cache misses one token, so each round starts the draft with a 2-token step that (re)writes the two
newest committed tokens — rows that had the older one recompute identical K/V.
"""

from __future__ import annotations

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
        tokens = torch.zeros(b, n_tok + gamma + 1, dtype=torch.long, device=dev)  # padded: no clamped writes
        p0 = probs_from_logits(cfg.guide(logits, params.cfg_active(0)), params)
        tokens[:, 0] = sample_from_probs(p0, rng.uniform(1)[:, 0])
        n = torch.ones(b, dtype=torch.long, device=dev)
        if progress:
            progress(b)
        accepted_lengths: list[int] = []
        first_round = True
        ar = torch.arange(gamma + 1, device=dev)
        while bool((n < n_tok).any()):
            live = n < n_tok
            remaining = torch.where(live, n_tok - n, torch.zeros_like(n))
            room = torch.where(live, spec.s_max - tcache.length[:b], torch.full_like(n, spec.s_max))
            g = int(min(gamma, int(remaining.max()) - 1, int(room.min()) - 1))
            drafts, q = self._draft(draft, dcache, tokens, n, g, cfg, params, rng, first_round, spec)
            first_round = False
            # target verifies [last, d_1 .. d_g]
            last = tokens.gather(1, (n - 1)[:, None])
            feed = torch.cat([last, drafts], 1)
            tok_index = n[:, None] + ar[: g + 1]
            pos = ((n - 1)[:, None] + ar[: g + 1]).clamp(max=n_tok - 1)
            write = tcache.length.clamp(max=spec.s_max - (g + 1))
            out = engine.step(tcache, cfg.expand(feed), cfg.expand(pos), write, tcache.causal_mask(write, g + 1))
            P = probs_from_logits(cfg.guide(out, cfg.active(tok_index)), params)
            allowed = live[:, None] & (tok_index[:, :g] < n_tok)
            u = rng.uniform(g + 1)
            res = verify_chain(P, q, drafts, allowed, u[:, :g], u[:, g], self.rule)
            k = res.accepted
            vals = torch.cat([drafts, res.token[:, None]], 1)
            vals.scatter_(1, k[:, None], res.token[:, None])
            keep = (ar[: g + 1][None, :] <= k[:, None]) & live[:, None] & (tok_index < n_tok)
            tokens.scatter_(1, tok_index, torch.where(keep, vals, tokens.gather(1, tok_index)))
            adv = torch.where(live, torch.minimum(k + 1, remaining), torch.zeros_like(k))
            n = n + adv
            tcache.length += cfg.expand(adv)
            dcache.length.copy_(tcache.length.to(dcache.length.device))
            accepted_lengths += adv[live].tolist()
            if progress:
                progress(int(adv.sum()))
        return DecodeResult(tokens[:, :n_tok].contiguous(), {"accepted_lengths": accepted_lengths})

    def _draft(self, draft, dcache, tokens, n, g, cfg, params, rng, first_round, spec):
        """g draft tokens per row from the draft model, and the distributions they came from."""
        b = n.shape[0]
        dev = draft.device
        n_tok = spec.n_tokens
        drafts = torch.zeros(b, g, dtype=torch.long, device=dev)
        q = torch.zeros(b, g, spec.vocab_size, device=dev)
        if g == 0:
            return drafts, q
        # Catch-up step: the two newest committed tokens (one in the first round).
        c = 1 if first_round else 2
        idx = (n[:, None] - c + torch.arange(c, device=dev)).clamp(min=0)
        feed = tokens.gather(1, idx).to(dev)
        write = (dcache.length - (c - 1)).clamp(min=spec.cond_len, max=spec.s_max - c)
        out = draft.step(dcache, cfg.expand(feed), cfg.expand(idx.clamp(max=n_tok - 1)), write, dcache.causal_mask(write, c))[:, -1]
        dcache.length.copy_(write + c)
        for j in range(g):
            t_index = (n + j).clamp(max=n_tok - 1)
            qj = probs_from_logits(cfg.guide(out, cfg.active(t_index)), params)
            dj = sample_from_probs(qj, rng.uniform(1)[:, 0])
            drafts[:, j], q[:, j] = dj, qj
            if j == g - 1:
                break
            write = dcache.length.clamp(max=spec.s_max - 1)
            pos = t_index.view(-1, 1)
            out = draft.step(dcache, cfg.expand(dj.view(-1, 1)), cfg.expand(pos), write, dcache.causal_mask(write, 1))[:, 0]
            dcache.length += 1
        return drafts, q
