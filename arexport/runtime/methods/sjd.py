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

Every image has its own window length L_i = min(window, tokens left) (1 outside the interval); with
the default (latency-aware) window each image also chooses per step between its window and L_i = 1
from its own history (WindowArms). A batch step feeds max L_i positions and shorter rows pad into
their cache lookahead; an image reads the same random lanes whatever that width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from arexport.errors import ArexportError
from arexport.runtime.methods.base import Decoder, Method, Options, option, register
from arexport.runtime.sampling import sample_from_probs
from arexport.runtime.speculative import SampledProposals, StandardRule, WindowArms, per_row_lanes, verify_chain
from arexport.runtime.step_cost import prices

INITS = ("random", "repeat_horizon")
HOST_BOOKKEEPING = True  # numpy bookkeeping on a CPU (`SJDDecoder._commit_host`); tests compare both branches


@dataclass(frozen=True)
class SJDOptions(Options):
    window: Optional[int] = option(None, "Jacobi window L: tokens verified per step. Default: latency-aware, each image "
                                   "verifies per step its whole window (16, or the engine's largest verify block if "
                                   "smaller) or one token, whichever commits more tokens per unit of a fixed step-cost "
                                   "model (or of --latency-profile); a number pins it", flag="--window")
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
        self.batch_sampling_keys = self.rule.batch_sampling_keys
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
        self.count = s.image_list()  # committed tokens per image (host ints: the step's shape needs them)
        self.feed = s.image_tensor((w,))  # the next window: [newest committed token, drafts d_1 .. d_{w-1}]
        # where each draft was drawn from: a row of the last step's distributions (`self.rows`), or -1
        # for a one-hot proposal (a new draft)
        self.source = s.image_tensor((w - 1,), fill=-1)
        self.rows: Optional[torch.Tensor] = None
        self.lanes = torch.arange(w + 1, device=s.device)
        self.images = torch.arange(capacity, device=s.device)
        self.arms = None
        # on a CPU the per-step bookkeeping runs in numpy on views of these buffers (`_commit_host`):
        # the same integer arithmetic as the tensor code, at a fraction of torch's per-op cost
        self.host = s.device.type == "cpu" and o.init == "random" and HOST_BOOKKEEPING
        if self.host:
            self._np = {"feed": self.feed.numpy(), "source": self.source.numpy(), "tokens": self.tokens.numpy(),
                        "lanes": self.lanes.numpy(), "images": self.images.numpy()}
        if adaptive:  # per image, the whole window or one token per step, priced at one image's rows (no clock)
            pr = prices(self.engine, self.cfg.per_image, w)
            self.arms = WindowArms(s, pr.target, w, pr.host)

    def start(self, a, b, conds):
        s = self.slots
        logits = self.prefill(self.engine, self.cache, a, b, self.cfg.conditions(self.engine, conds))
        first = self.first_token(logits, a, b)
        self.tokens[a:b, 0] = first
        self.count[a:b] = [1] * (b - a)
        for st in s.stats[a:b]:
            st.forwards += 1
        u = s.uniform(self.window - 1, s.span(a, b))[a:b]
        self._pad_drafts(slice(a, b), first, None, None, None, self._random_tokens(u))

    def advance(self):
        s, o, rule, cfg = self.slots, self.opts, self.rule, self.cfg
        b, n_tok, dev = s.n, self.spec.n_tokens, s.device
        arms = [self.window] * b if self.arms is None else self.arms.choose(b)
        count = self.count
        # per image: positions fed (its window; 1 outside [start, end)) and drafts that may be accepted
        qlen = [min(n_tok - c, arm) if o.start <= c < self.end else 1 for c, arm in zip(count, arms)]
        Q = max(qlen)
        # through numpy: torch.tensor on nested lists costs several times more on a CPU
        steps = np.array([count, qlen, [min(q - 1, self.end - c) for q, c in zip(qlen, count)]], dtype=np.int64)
        if self.host:  # the window's token indices, positions and tokens fed, in numpy (see __init__)
            tok = steps[0][:, None] + self._np["lanes"][:Q]  # the token each output position predicts
            pos, fed = np.minimum(tok - 1, n_tok - 1), self._np["feed"][:b, :Q]
            if cfg.per_image > 1:  # the CFG rows of each image
                pos, fed = np.repeat(pos, cfg.per_image, 0), np.repeat(fed, cfg.per_image, 0)
            tok_index, length, accept = torch.from_numpy(tok), torch.from_numpy(steps[1]), torch.from_numpy(steps[2])
            positions, fed = torch.from_numpy(pos), torch.from_numpy(fed)
        else:
            n, length, accept = torch.from_numpy(steps).to(dev)
            tok_index = n[:, None] + self.lanes[:Q]  # the token each output position predicts
            positions, fed = cfg.expand((tok_index - 1).clamp(max=n_tok - 1)), cfg.expand(self.feed[:b, :Q])
        # everything that does not need the logits comes first: an engine call evicts the host's
        # code and data from the CPU caches, and the same work costs 2-3x right after it
        u, u_new = s.uniforms(2 * Q, self.window - 1)  # this step's and the new drafts'
        u_accept, u_draw = per_row_lanes(u, length, Q, self.lanes)
        drafts = self.feed[:b, 1:Q]
        proposals = SampledProposals(self.rows, self.source[:b, : Q - 1], drafts, self.spec.vocab_size)
        new = self._random_tokens(u_new)  # new drafts, where needed
        view = self.cache.view(0, s.rows)
        write = view.length.clone()
        out = self.engine.step(view, fed, positions, write, view.causal_mask(write, Q))
        params = self.params
        P = rule.target_probs(cfg.guide(out, tok_index, params), params)
        # the token after the accepted run, and fresh samples from this step's p (what the unverified
        # tail becomes; the rule's bonus: argmax under LANTERN's greedy variant)
        res = verify_chain(P, proposals, drafts, accept, u_accept, u_draw[:, 0], rule)
        P = rule.bonus(P)
        k, token, fresh = res.accepted, res.token, sample_from_probs(P, u_draw[:, 1:])
        self.rows = P.view(-1, P.shape[-1])
        if self.host:
            advanced = self._commit_host(b, k, token, fresh, length, tok_index, drafts, new, view.length)
        else:
            token1 = token[:, None]
            vals = torch.cat([drafts, token1], 1).scatter_(1, k[:, None], token1)
            self.tokens[:b].scatter_(1, tok_index, vals)  # past n + k: rewritten before they are committed
            adv = k + 1
            cfg.add_per_image(view.length, adv)  # the cache keeps `last` and the accepted drafts
            advanced = adv.tolist()
            self._pad_drafts(slice(0, b), token, fresh, length, adv, new)
        for i, (st, a) in enumerate(zip(s.stats[:b], advanced)):
            count[i] += a
            st.forwards += 1
            st.accepted.append(a)
        if self.arms is not None:  # a window cut short by an image's end says little
            self.arms.observe(advanced, [q == a for q, a in zip(qlen, arms)])
        return [i for i, c in enumerate(count) if c >= n_tok]

    def _commit_host(self, b, k, token, fresh, length, tok_index, drafts, new, lengths) -> list[int]:
        """The tensor branch of `advance` after verification and `_pad_drafts` (random drafts) in numpy
        on the CPU buffers' views, with the same integers: commit the accepted drafts and the token,
        advance the cache lengths, and write the next window. Returns the tokens committed per image."""
        a = self._np
        k, token, fresh = k.numpy(), token.numpy(), fresh.numpy()
        vals = np.concatenate([drafts.numpy(), token[:, None]], 1)  # a copy: the window is rewritten below
        vals[a["images"][:b], k] = token
        np.put_along_axis(a["tokens"][:b], tok_index.numpy(), vals, 1)  # past n + k: rewritten before committed
        adv = k + 1
        rows = lengths.numpy()
        rows += np.repeat(adv, rows.shape[0] // b)  # every row of an image (CFG pairs): the cache keeps the run
        # the next window: the token, then fresh samples after the run where there are some, else new drafts
        feed, source, size = a["feed"][:b], a["source"][:b], self.window - 1
        feed[:, 0] = token
        idx = adv[:, None] + a["lanes"][:size]
        miss = idx >= length.numpy()[:, None]
        src = np.minimum(idx, fresh.shape[1] - 1)
        feed[:, 1:] = np.where(miss, new.numpy(), np.take_along_axis(fresh, src, 1))
        row = src + a["images"][:b, None] * fresh.shape[1]  # rows of this step's [B * Q, V]
        row[miss] = -1
        source[:] = row
        return adv.tolist()

    def finish(self, i):
        return self.finished(i, self.tokens[i, : self.spec.n_tokens].clone())

    def _random_tokens(self, u: torch.Tensor) -> torch.Tensor:
        """Uniform token ids from uniforms u in [0, 1): floor(u * v) over the ids a draft can be. A grid
        with a forced end-of-line id (Emu3, Lumina-mGPT: eol_id = V, the last id) draws codebook ids
        only, as the official SJD draws image tokens only (jacobi_iteration_lumina_mgpt.py l.502-509)."""
        v = int(self.spec.extra.get("eol_id", self.spec.vocab_size))
        return (u * v).long().clamp(max=v - 1)

    def _pad_drafts(self, rows: slice, last, fresh, fresh_len, start, new):
        """The next window of images `rows`: `last` (the newest committed token) and drafts for the
        positions after it: fresh[:, start + i] where available (below each row's fresh_len), else
        new drafts (one-hot proposals): `new` [B, L-1], uniform random tokens.

        fresh: this step's samples [B, Q], drawn from `self.rows` viewed as [B, Q, V] (None on the
        first call); start [B]: index in `fresh` of the first draft's position."""
        feed, source = self.feed[rows], self.source[rows]
        size = self.window - 1
        feed[:, 0] = last
        if fresh is None:
            miss = d = None
        else:
            idx = start[:, None] + self.lanes[:size]
            miss = idx >= fresh_len[:, None]  # no fresh sample there: a new draft
            src = idx.clamp(max=fresh.shape[1] - 1)
            d = fresh.gather(1, src)
        if self.opts.init == "repeat_horizon":  # copy the previous token of the same image row
            n = torch.tensor(self.count[rows], device=last.device)  # position of the first draft
            rand, new, prev = new, torch.empty_like(new), last
            for i in range(size):
                new[:, i] = torch.where((n + i) % self.spec.grid_size == 0, rand[:, i], prev)
                prev = new[:, i] if miss is None else torch.where(miss[:, i], new[:, i], d[:, i])
        if miss is None:
            feed[:, 1:], source[:] = new, -1
            return
        torch.where(miss, new, d, out=feed[:, 1:])
        row = src + self.images[: fresh.shape[0], None] * fresh.shape[1]  # rows of this step's [B * Q, V]
        source.copy_(row.masked_fill_(miss, -1))


@register("sjd")
class SJD(Method):
    """Speculative Jacobi Decoding over the verify-block step."""

    Options = SJDOptions
    help = "Speculative Jacobi Decoding: verify a window of drafts per step, lossless"

    def decoder(self, ctx, capacity, rule=None):
        return SJDDecoder(ctx, capacity, rule)
