"""NAR (ThisisBillhe/NAR, "Neighboring Autoregressive Modeling for Efficient Visual Generation"): a
LlamaGen-shaped GPT that predicts, from every token, its right neighbour (head `output` after block
n_layer) and its lower neighbour (head `medusa_output` after the extra blocks) (models/nar.py).

Decoding (`--method nar`, runtime/methods/nar.py) generates the grid anti-diagonal by anti-diagonal:
2 g - 1 forwards for a g x g grid (31 at 256 px). The step graph is the `token_two_heads` kind (both
heads' logits); the cache holds the class token and the tokens in generation order, and the runtime's
mask lets each fed token see every slot up to the end of its own diagonal (the proximity mask).
"""

from __future__ import annotations

import torch

from arexport.errors import ArexportError
from arexport.families.base import Conditions
from arexport.families.llamagen import LlamaGenFamily

STEP_KIND = "token_two_heads"


def diagonal_order(grid: int) -> torch.Tensor:
    """Raster cells in NAR's generation order [grid * grid]: anti-diagonal by anti-diagonal (row + column
    = 0, 1, ...), each from its top row down."""
    return torch.tensor([r * grid + (d - r) for d in range(2 * grid - 1) for r in range(grid) if 0 <= d - r < grid])


def diagonal_sizes(grid: int) -> list[int]:
    """Tokens on each anti-diagonal: 1, 2, ..., grid, ..., 2, 1."""
    return [min(d + 1, 2 * grid - 1 - d) for d in range(2 * grid - 1)]


class NARFamily(LlamaGenFamily):
    """Class-conditional NAR models: LlamaGen's conditions and VQ-16 images, two-head steps, `nar` decoding."""

    name = "nar"
    methods = ("nar",)
    default_method = "nar"
    step_kinds = (STEP_KIND,)
    default_verify_len = 16  # the longest anti-diagonal of the released 16 x 16 grid

    def caption_prefill(self, spec) -> bool:
        return False

    def sampling_defaults(self, spec):
        # sample_c2i.py's defaults: constant guidance 4.0, top-k 2000
        return {"cfg_scale": 4.0, "top_k": 2000, "top_p": 1.0, "temperature": 1.0, "cfg_schedule": "constant"}

    def prefill(self, engine, cache, conds: Conditions) -> torch.Tensor:
        """The class token at slot 0; logits [B, V] of cell (0, 0): the mean of the class position's two heads
        (the reference's prefill)."""
        spec = engine.spec
        if spec.model_type != "c2i":
            raise ArexportError(f"{spec.name}: NAR models here are class-conditional")
        b, dev = len(conds), engine.device
        zero = torch.zeros(b, dtype=torch.int64, device=dev)
        tokens = self.condition_tokens(spec, conds.classes.to(dev)).view(b, 1)
        positions = torch.full((b, 1), -1, dtype=torch.int64, device=dev)
        out = engine.run(STEP_KIND, cache, label="prefill", tokens=tokens, positions=positions, write_index=zero,
                         attn_mask=cache.causal_mask(zero, 1))
        cache.length.fill_(spec.cond_len)
        return (out["logits"][:, 0] + out["logits_below"][:, 0]) / 2

    def prefill_hidden(self, engine, cache, conds: Conditions):
        return self.prefill(engine, cache, conds), None
