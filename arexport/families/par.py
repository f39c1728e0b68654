"""PAR (Epiphqny/PAR, "Parallelized Autoregressive Visual Generation"): a LlamaGen GPT that, after a
sequential start, predicts k spatially distant tokens per forward.

The grid is cut into k = s * s regions (s regions per side); the generation order visits the same
in-region position of every region in turn (region raster inside, in-region raster outside), so the
k tokens of one group are far apart. The first k tokens (one per region) come one at a time; then k
learned transition tokens' worth of queries: the k-th token fed together with k - 1 transition
tokens (zero RoPE) predicts the next group of k at once, and every later step feeds the group just
sampled to predict the next one, the tokens of a step seeing each other. Forwards per image:
k + n_tokens / k - 1 (67 for 16 x 16 tokens at k = 4; 147 for the released
24 x 24 grids at k = 4, 51 at k = 16).

The step graph is the plain `token` kind (q tokens in at positions, q logits out): the transition
tokens are ids of the token space (after the class tokens) fed at position -1 (zero RoPE, as the
condition), so no step kind of its own is needed. Only `--method par` applies: raster methods would
feed tokens in an order the model was not trained on.
"""

from __future__ import annotations

import math

import torch

from arexport.errors import ArexportError
from arexport.families.llamagen import LlamaGenFamily


def par_order(grid_size: int, k: int) -> torch.Tensor:
    """Grid positions (raster index) in PAR's generation order: [grid_size ** 2] int64.

    Sequence index j = ((r * m + c) * s + R) * s + C, with s = sqrt(k) regions per side, m = grid_size / s
    cells per region side, (R, C) the region and (r, c) the cell inside it; its grid position is
    (R * m + r) * grid_size + C * m + c."""
    s = math.isqrt(k)
    if s * s != k or k < 1:
        raise ArexportError(f"PAR's parallel token count must be a square (1, 4, 16, ...), got {k}")
    if grid_size % s:
        raise ArexportError(f"PAR with {k} parallel tokens needs a grid divisible by {s}, got {grid_size}")
    m = grid_size // s
    r, c, R, C = torch.meshgrid(*(torch.arange(n) for n in (m, m, s, s)), indexing="ij")
    return ((R * m + r) * grid_size + C * m + c).reshape(-1)


class PARFamily(LlamaGenFamily):
    """Class-conditional PAR models: LlamaGen's class prefill and conditions, its own method."""

    name = "par"
    methods = ("par",)
    default_method = "par"
    default_verify_len = 16  # the largest released k (PAR-3B-16x)

    def caption_prefill(self, spec) -> bool:
        return False

    def sampling_defaults(self, spec):
        # sample_c2i_ddp.py's defaults (the FID runs): cfg 1.5, no top-k/top-p, temperature 1
        return {"cfg_scale": 1.5, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "cfg_schedule": "constant"}

    def parallel_tokens(self, spec) -> int:
        """k: tokens per parallel step (the model's ar_token_num)."""
        k = spec.extra.get("parallel_tokens")
        if not isinstance(k, int):
            raise ArexportError(f"{spec.name} records no parallel_tokens: not a PAR model spec")
        return k

    def transition_tokens(self, spec) -> torch.Tensor:
        """Token ids of the k - 1 transition tokens [k - 1] int64."""
        return spec.extra["transition_token_offset"] + torch.arange(self.parallel_tokens(spec) - 1)
