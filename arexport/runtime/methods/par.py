"""`par`: PAR's parallelized decoding (Epiphqny/PAR `autoregressive/models/generate.py` `generate`).

Generation order is PAR's region-interleaved order (families.par.par_order). One image takes
k + N / k - 1 forwards through the `token` step (N tokens, k parallel tokens):
* call 0 feeds the class token (position -1) and samples token 0 (the reference's prefill);
* calls 1 .. k-1 feed the newest token and sample the next, one at a time (`decode_n_tokens`);
* call k feeds token k-1 with the k - 1 transition tokens (position -1) and samples tokens k .. 2k-1
  from their k outputs; every later call feeds the k tokens just sampled and samples the next k
  (`decode_n_tokens_multi`). Tokens fed in one call see each other and everything before them.

Guidance is the sampler's (PAR: constant `u + s (c - u)`), at each token's generation index for
schedules; `cfg_interval` counts as the reference does: a sequential token t is guided while
t <= interval + 1, a parallel step while its offset i = (its first token - k) <= interval (the
reference restarts its step counter there). Sampling: temperature, top-k, top-p, per image stream.

Images of one batch may be at different calls (continuous batching): feeds are padded to the
batch's largest (k at most), pads written past each row's length, where nothing reads them.
"""

from __future__ import annotations

import dataclasses

import torch

from arexport.errors import ArexportError
from arexport.families.par import par_order
from arexport.runtime.methods.base import Decoder, Method, Options, register
from arexport.runtime.sampling import RowParams, probs_from_logits, row_params, sample_from_probs

CLASS = -1  # feed code of the class token; transition token j is -2 - j; >= 0 a generation index


def par_calls(n_tokens: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PAR's schedule: feed codes [C, k] (CLASS, -2 - j for transition j, else the generation index fed;
    pads repeat the last entry), tokens per call [C] (fed = sampled) and the generation index of each
    call's first sampled token [C], with C = k + n_tokens / k - 1."""
    if n_tokens % k or n_tokens < 2 * k:
        raise ArexportError(f"PAR with {k} parallel tokens needs a multiple of {k} tokens, at least {2 * k}, got {n_tokens}")
    feeds, sizes, starts = [[CLASS] * k], [1], [0]
    for c in range(1, k):  # sequential start
        feeds.append([c - 1] * k)
        sizes.append(1)
        starts.append(c)
    feeds.append([k - 1] + [-2 - j for j in range(k - 1)])  # the transition step
    sizes.append(k)
    starts.append(k)
    for first in range(2 * k, n_tokens, k):  # the group sampled last predicts the next group
        feeds.append(list(range(first - k, first)))
        sizes.append(k)
        starts.append(first)
    return torch.tensor(feeds), torch.tensor(sizes), torch.tensor(starts)


@dataclasses.dataclass(frozen=True)
class PAROptions(Options):
    """PAR has no options of its own: k is the model's, the schedule the reference's."""


class PARDecoder(Decoder):
    def __init__(self, ctx, capacity):
        super().__init__(ctx, capacity, 2 if ctx.params.uses_cfg else 1)
        spec, s = self.spec, self.slots
        fam = self.engine.family
        if not hasattr(fam, "parallel_tokens"):
            raise ArexportError(f"method par needs a PAR model; {spec.name} is a {spec.family} model")
        self.k = k = fam.parallel_tokens(spec)
        if k > self.engine.max_q:
            raise ArexportError(f"PAR steps of {k} tokens exceed the engine's maximum query length {self.engine.max_q}: "
                                f"rebuild with --verify-len >= {k}")
        dev = s.device
        feeds, sizes, starts = par_calls(spec.n_tokens, k)
        self.feeds, self.sizes, self.starts = feeds.to(dev), sizes.to(dev), starts.to(dev)
        self.n_calls = len(sizes)
        self.order = par_order(spec.grid_size, k).to(dev)  # grid position of each generation index
        self.trans = fam.transition_tokens(spec).to(dev)
        self.cache = s.cache(self.engine.allocate(capacity * self.cfg.per_image))
        self.seq = s.image_tensor((spec.n_tokens,))  # tokens in generation order
        self.c = s.image_tensor(())  # next call
        self.cls = s.row_tensor((), torch.int64)  # class token per row (null class on guidance rows)

    def start(self, a, b, conds):
        r0, r1, cls = self.fresh_class_rows(a, b, conds)
        self.cls[r0:r1] = cls

    def advance(self):
        s, cfg, k = self.slots, self.cfg, self.k
        n, rows = s.n, s.rows
        c = self.c[:n]
        size, first = self.sizes[c], self.starts[c]
        q = int(size.max())
        code = self.feeds[c][:, :q]  # [n, q]
        idx = code.clamp(min=0)
        img_tok, img_pos = self.seq[:n].gather(1, idx), self.order[idx]
        trans = self.trans[(-2 - code).clamp(min=0, max=k - 2)]
        tok = cfg.expand(torch.where(code >= 0, img_tok, trans))
        tok = torch.where(cfg.expand(code) == CLASS, self.cls[:rows, None].expand(-1, q), tok)
        pos = cfg.expand(torch.where(code >= 0, img_pos, torch.full_like(img_pos, -1)))
        view = self.cache.view(0, rows)
        w = view.length.clone()
        fed = cfg.expand(size)
        logits = self.engine.step(view, tok, pos, w, view.block_mask(w, q, fed=fed))
        view.length += fed
        out_idx = (first[:, None] + torch.arange(q, device=s.device)).clamp(max=self.spec.n_tokens - 1)  # [n, q]
        logits = self.guide(logits, out_idx, first)
        new = sample_from_probs(probs_from_logits(logits, self.params), s.uniform(q))
        keep = torch.arange(q, device=s.device)[None, :] < size[:, None]
        self.seq[:n].scatter_(1, out_idx, torch.where(keep, new, self.seq[:n].gather(1, out_idx)))
        self.c[:n] += 1
        for st, m in zip(s.stats[:n], size.tolist()):
            st.forwards += 1
            st.accepted.append(m)
        return s.where(self.c[:n] == self.n_calls)

    def guide(self, logits, out_idx, first):
        """Guided logits [n, q, V]: the schedule at each token's generation index, the reference's interval rule."""
        if self.cfg.per_image == 1:
            return logits
        params = self.params
        per_image = params.per_image if isinstance(params, RowParams) else [params] * self.slots.n
        if all(p.cfg_interval < 0 for p in per_image):
            return self.cfg.guide(logits, out_idx, params)
        plain = row_params([dataclasses.replace(p, cfg_interval=-1) for p in per_image], logits.device)
        guided = self.cfg.guide(logits, out_idx, plain)
        # the reference's counters: sequential token t is guided while t - 1 <= interval (token 0, the
        # prefill, always); a parallel step whose first token is f while f - k <= interval
        interval = torch.tensor([p.cfg_interval for p in per_image], device=logits.device)
        count = torch.where(first < self.k, first - 1, first - self.k)
        active = (interval < 0) | (count <= interval)
        return torch.where(active[:, None, None], guided, logits[0::2])

    def finish(self, i):
        raster = torch.empty_like(self.seq[i])
        raster[self.order] = self.seq[i]
        return self.finished(i, raster)


@register("par")
class PARMethod(Method):
    """PAR: k tokens per forward after k sequential ones (the model's k)."""

    Options = PAROptions
    decoder_class = PARDecoder
    help = "PAR parallelized decoding: k distant tokens per step after a sequential start (PAR models)"
