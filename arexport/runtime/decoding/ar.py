"""`ar`: one token per step in raster order — LlamaGen's sampler, the reference for every method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from arexport.runtime.decoding.base import CFGRows, DecodeResult, Method, register
from arexport.runtime.sampling import sample_logits

GuideFn = Callable[[torch.Tensor, int], torch.Tensor]  # (row logits, token index) -> per-image logits


@dataclass
class ARState:
    """An AR decode in progress: the cache, the logits for the next token, and tokens so far."""

    cache: object
    logits: torch.Tensor  # [rows, V] logits predicting token `t`
    tokens: torch.Tensor  # [B, n_tokens]
    t: int = 0  # next token index


def ar_start(engine, conds, cfg: CFGRows) -> ARState:
    """Prefill the condition rows; the state predicts token 0."""
    cache = engine.allocate(cfg.rows)
    logits = engine.prefill(cache, cfg.conditions(engine, conds))
    tokens = torch.empty(len(conds), engine.spec.n_tokens, dtype=torch.int64, device=engine.device)
    return ARState(cache, logits, tokens)


def ar_advance(engine, st: ARState, until: int, cfg: CFGRows, params, rng, progress=None,
               guide: Optional[GuideFn] = None, on_token: Optional[Callable] = None) -> ARState:
    """Sample tokens st.t .. until-1, one step each (CFG rows share every sampled token).
    on_token(tok [B], t) is called after each sample (side caches stepping in lockstep)."""
    n = engine.spec.n_tokens
    guide = guide or (lambda logits, t: cfg.guide(logits, params.cfg_active(t)))
    while st.t < until:
        t = st.t
        tok = sample_logits(guide(st.logits, t), params, rng.uniform(1)[:, 0])
        st.tokens[:, t] = tok
        st.t += 1
        if on_token is not None and st.t < n:
            on_token(tok, t)
        if progress:
            progress(tok.shape[0])
        if st.t == n:
            break
        write = st.cache.length.clone()
        feed = cfg.expand(tok).view(-1, 1)
        st.logits = engine.step(st.cache, feed, torch.full_like(feed, t), write, st.cache.causal_mask(write, 1))[:, 0]
        st.cache.length += 1
    return st


@register("ar")
class AR(Method):
    """Prefill, then n_tokens - 1 single-token steps."""

    def generate(self, engine, conds, params, rng, progress=None, draft=None):
        b, n = len(conds), engine.spec.n_tokens
        cfg = CFGRows(params, b)
        st = ar_advance(engine, ar_start(engine, conds, cfg), n, cfg, params, rng, progress)
        return DecodeResult(st.tokens, {"forwards_per_row": [n] * b, "accepted_lengths": [1] * (b * (n - 1))})
