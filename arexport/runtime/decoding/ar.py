"""`ar`: one token per step in raster order — LlamaGen's sampler, the reference for every method."""

from __future__ import annotations

import torch

from arexport.runtime.decoding.base import CFGRows, DecodeResult, Method, register
from arexport.runtime.sampling import sample_logits


@register("ar")
class AR(Method):
    """Prefill, then n_tokens - 1 single-token steps; CFG rows share every sampled token."""

    def generate(self, engine, conds, params, rng, progress=None, draft=None):
        spec = engine.spec
        b, n = len(conds), spec.n_tokens
        cfg = CFGRows(params, b)
        cache = engine.allocate(cfg.rows)
        logits = engine.prefill(cache, cfg.conditions(engine, conds))
        tokens = torch.empty(b, n, dtype=torch.int64, device=engine.device)
        for t in range(n):
            tok = sample_logits(cfg.guide(logits, params.cfg_active(t)), params, rng.uniform(1)[:, 0])
            tokens[:, t] = tok
            if progress:
                progress(1)
            if t == n - 1:
                break
            write = cache.length.clone()
            feed = cfg.expand(tok).view(-1, 1)
            pos = torch.full_like(feed, t)
            logits = engine.step(cache, feed, pos, write, cache.causal_mask(write, 1))[:, 0]
            cache.length += 1
        return DecodeResult(tokens, {"accepted_lengths": [1] * (b * (n - 1))})
