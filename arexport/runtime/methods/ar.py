"""`ar`: one token per step in raster order — LlamaGen's sampler, the reference for every method.

Each step samples the next token of every live image from its pending logits (CFG rows share the
sampled token), then feeds the new tokens in one q = 1 step to get the next logits. The decoder
also carries N candidates per image in lockstep, which is all GridAR and best-of-N need on top.
"""

from __future__ import annotations

import torch

from arexport.families import Conditions
from arexport.runtime.methods.base import Decoder, Finished, Method, Options, register
from arexport.runtime.rng import derive_seeds
from arexport.runtime.sampling import SamplingParams, sample_logits


class ARDecoder(Decoder):
    """Raster AR over `candidates` rows per image (1 for `ar`); subclasses add checkpoints."""

    derive_streams = False  # candidates draw from streams derived from the image seed (GridAR)

    def __init__(self, ctx, capacity: int, candidates: int = 1):
        r = 2 if ctx.params.uses_cfg else 1
        super().__init__(ctx, capacity, candidates * r, streams=candidates)
        self.N = candidates
        s, n_tok = self.slots, self.spec.n_tokens
        self.cache = s.cache(self.engine.allocate(capacity * candidates * r))
        self.logits = s.row_tensor((self.spec.vocab_size,))  # pending logits per row, predicting token t
        self.tokens = s.image_tensor((candidates, n_tok))
        self.t = s.image_tensor(())  # next token index (candidates move in lockstep)
        self.left = s.image_list()  # tokens still to sample per image (host ints: the finished check needs no sync)

    def start(self, a: int, b: int, conds: Conditions) -> None:
        s = self.slots
        if self.derive_streams:  # candidate c of image i: a stream derived from image i's seed
            s.seeds[a:b] = derive_seeds(s.seeds[a:b, 0].repeat_interleave(self.N),
                                        torch.arange(self.N, device=s.device).repeat(b - a)).view(b - a, self.N)
        r0, r1 = s.rows_of(a, b)
        rows = self.cfg.conditions(self.engine, conds.repeat_interleave(self.N))
        self.logits[r0:r1] = self.prefill(self.engine, self.cache, a, b, rows)
        self.t[a:b] = 0
        self.left[a:b] = [self.spec.n_tokens] * (b - a)
        for st in s.stats[a:b]:
            st.forwards += 1

    def advance(self) -> list[int]:
        n, N = self.slots.n, self.N
        t = self.t[:n] if N == 1 else self.t[:n].repeat_interleave(N)  # per candidate (a copy only when there are several)
        params = self.candidate_params()
        guided = self.guide(self.logits[:self.slots.rows], t, params)
        tok = sample_logits(guided, params, self.slots.uniform(1)[:, 0])
        self.tokens[:n].view(n * N, -1).scatter_(1, t[:, None], tok[:, None])
        self.t[:n] += 1
        left = self.left
        for i in range(n):
            left[i] -= 1
        return [i for i in range(n) if not left[i]]

    def candidate_params(self):
        """Sampling per candidate row of the live images (each image's, N times)."""
        p = self.params
        return p if self.N == 1 or isinstance(p, SamplingParams) else p.repeat_interleave(self.N)

    def guide(self, logits, token_index, params):
        """Per-row logits -> per-candidate guided logits (GridAR's 3-way CFG overrides this)."""
        return self.cfg.guide(logits, token_index, params)

    def after(self) -> None:
        """Feed every live candidate's newest token (q = 1) for the next logits."""
        n, rows = self.slots.n, self.slots.rows
        t = (self.t[:n] if self.N == 1 else self.t[:n].repeat_interleave(self.N)) - 1  # index of the newest token
        tok = self.tokens[:n].view(n * self.N, -1).gather(1, t[:, None])
        view = self.cache.view(0, rows)
        write = view.length.clone()
        feed, pos = self.cfg.expand(tok), self.cfg.expand(t[:, None])
        self.logits[:rows] = self.engine.step(view, feed, pos, write, view.causal_mask(write, 1))[:, 0]
        view.length += 1
        for st in self.slots.stats[:n]:
            st.forwards += 1
            st.accepted.append(1)

    def finish(self, i: int) -> Finished:
        return self.finished(i, self.tokens[i, 0].clone())


@register("ar")
class AR(Method):
    """Prefill, then n_tokens - 1 single-token steps."""

    Options = Options
    decoder_class = ARDecoder
    help = "LlamaGen's sampler: one token per step"
