"""What RandAR and LPD decoding share: a random generation order per image and committing one group of
tokens per forward (the group's logits gathered from the fed positions, guided, sampled and written into
the generation-order sequence), un-permuted into raster order at the end."""

from __future__ import annotations

import torch

from arexport.runtime.kv_cache import arange
from arexport.runtime.methods.base import Decoder
from arexport.runtime.sampling import probs_from_logits, sample_from_probs


def generation_order(keys: torch.Tensor) -> torch.Tensor:
    """Grid positions in generation order [b, N] from uniforms [b, N]: a random permutation per image."""
    return keys.argsort(dim=1)


class RandomOrderDecoder(Decoder):
    """A decoder with `seq` [capacity, N+] (tokens in generation order), `order` [capacity, N] (the grid
    position of each generation index), `c` [capacity] (forwards done) and `n_calls` (forwards per image)."""

    def commit_group(self, n: int, logits: torch.Tensor, at: torch.Tensor, guide_index: torch.Tensor,
                     first: torch.Tensor, size: torch.Tensor, m: int):
        """One forward's group for the n images: `logits` [rows, q, V] of the fed block, `at` [rows, m] the feed
        index of each query, `guide_index` [n, m] the token index the guidance schedule reads, `first` [n] the
        group's first generation index, `size` [n] its size (<= m; lanes past it keep their tokens)."""
        s = self.slots
        logits = logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))
        logits = self.guide_group(logits, guide_index)
        new = sample_from_probs(probs_from_logits(logits, self.params), s.uniform(m))
        lane = arange(m, logits.device)
        idx = first[:, None] + lane
        keep = lane[None, :] < size[:, None]
        self.seq[:n].scatter_(1, idx, torch.where(keep, new, self.seq[:n].gather(1, idx)))
        self.c[:n] += 1
        for st, k in zip(s.stats[:n], size.tolist()):
            st.forwards += 1
            st.accepted.append(k)
        return s.where(self.c[:n] == self.n_calls)

    def guide_group(self, logits: torch.Tensor, guide_index: torch.Tensor) -> torch.Tensor:
        """Per-row logits [rows, m, V] -> per-image guided logits [n, m, V]: the sampler's schedule at
        `guide_index` [n, m] (a method with a schedule of its own overrides this)."""
        return self.cfg.guide(logits, guide_index, self.params)

    def finish(self, i):
        raster = torch.empty_like(self.seq[i, : self.spec.n_tokens])
        raster[self.order[i]] = self.seq[i, : self.spec.n_tokens]
        return self.finished(i, raster)
