"""NAR (ThisisBillhe/NAR `NAR-images/autoregressive/models/gpt.py`, "Neighboring Autoregressive
Modeling"): a LlamaGen GPT with `n_layer + medusa_attention_num` blocks and two output heads. The
`output` head reads the hidden state after block n_layer and predicts the token to the right of each
fed token; `medusa_output` (after `medusa_norm`) reads the last block and predicts the token below.
See arexport.families.nar and runtime/methods/nar.py for the decoding side.

Parameters are LlamaGen's (`tok_embeddings`, `cls_embedding.embedding_table`, `layers.N.attention.wqkv`,
..., `norm`, `output`) with `layers` holding all n_layer + medusa_attention_num blocks, plus
`medusa_norm.weight` and `medusa_output.weight`: the released checkpoints' names.

Step graph: the `token_two_heads` kind (format/stepkinds.py): the plain token step's inputs, the two
heads' logits [B, q, V] as outputs, the cache over every block. Attention is the proximity mask: a
token sees the class token and every token whose Manhattan distance from the top-left corner is at
most its own (its own anti-diagonal included); the runtime builds it (in generation order it is
block-causal over diagonals).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn

from arexport.errors import ArexportError
from arexport.format.spec import ModelSpec, s_max_for
from arexport.models.catalog import Catalog
from arexport.models.llamagen import LlamaGen, LlamaGenConfig, RMSNorm, TransformerBlock, inplace_cache_write


@dataclass(frozen=True)
class NARConfig(LlamaGenConfig):
    """NAR's ModelArgs: LlamaGen's plus `medusa_attention_num` (blocks after the right head's, default 1)."""

    medusa_attention_num: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.model_type != "c2i" or self.cls_token_num != 1:
            raise ValueError("NAR models here are class-conditional with one class token (model_type c2i)")
        if self.medusa_attention_num < 0:
            raise ValueError(f"medusa_attention_num must be >= 0, got {self.medusa_attention_num}")

    @property
    def total_layers(self) -> int:
        return self.n_layer + self.medusa_attention_num

    def build(self) -> "NAR":
        return NAR(self)

    def spec(self, name: str, image_size: Optional[int] = None) -> ModelSpec:
        base = super().spec(name, image_size)
        return replace(base, family="nar", n_layer=self.total_layers, n_cache_layers=self.total_layers,
                       s_max=s_max_for(1, self.n_tokens), extra={**base.extra, "right_head_layer": self.n_layer})


def proximity_mask(grid: int) -> torch.Tensor:
    """[1 + N, 1 + N] bool over [class, raster tokens]: the class sees itself; a token sees the class and
    every token on its own or an earlier anti-diagonal."""
    rc = torch.arange(grid * grid)
    diag = torch.cat([torch.tensor([-1]), rc // grid + rc % grid])
    return diag[None, :] <= diag[:, None]


class NAR(LlamaGen):
    """NAR transformer: LlamaGen's blocks and cache plus the below head after the extra blocks."""

    STEP_WEIGHTS = ("layers.", "norm.", "output.", "medusa_norm.", "medusa_output.")

    @property
    def step_kinds(self) -> tuple[str, ...]:
        return ("token_two_heads",)

    def __init__(self, cfg: NARConfig):
        super().__init__(cfg)
        for _ in range(cfg.medusa_attention_num):
            self.layers.append(TransformerBlock(cfg))
        self.medusa_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.medusa_output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def heads(self, h_right: torch.Tensor, h_last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Right and below logits (fp32) from the hidden states after block n_layer and after the last block."""
        return self.output(self.norm(h_right)).float(), self.medusa_output(self.medusa_norm(h_last)).float()

    def forward(self, classes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Teacher forcing as the reference trains: classes [B] (num_classes = null), tokens [B, N] the whole
        raster grid, fed after the class under the proximity mask. Logits [B, N, V] fp32, row i predicting
        token i: the class position's two heads averaged for cell 0, the left neighbour's right head for the
        first row, the upper neighbour's below head for the first column, the mean of both elsewhere."""
        cfg = self.cfg
        b, n = tokens.shape
        g = cfg.grid_size
        if n != cfg.n_tokens:
            raise ArexportError(f"NAR teacher forcing takes the whole {g} x {g} grid ({cfg.n_tokens} tokens), got {n}")
        dev = tokens.device
        h = self.tok_dropout(torch.cat([self.condition_embeddings(classes), self.tok_embeddings(tokens)], 1))
        pos = torch.arange(-1, n, device=dev).expand(b, n + 1)
        cos, sin = self.rope(pos)
        mask = proximity_mask(g).to(dev)
        right = None
        for i, layer in enumerate(self.layers):
            h = layer.forward_full(h, cos, sin, mask, False)
            if i == cfg.n_layer - 1:
                right = h
        r, d = self.heads(right, h)
        v = r.shape[-1]
        out = torch.empty(b, g, g, v, dtype=r.dtype, device=dev)
        rg, dg = r[:, 1:].view(b, g, g, v), d[:, 1:].view(b, g, g, v)
        out[:, 0, 0] = (r[:, 0] + d[:, 0]) / 2
        out[:, 0, 1:] = rg[:, 0, :-1]  # right of the left neighbour
        out[:, 1:, 0] = dg[:, :-1, 0]  # below the upper neighbour
        out[:, 1:, 1:] = (rg[:, 1:, :-1] + dg[:, :-1, 1:]) / 2
        return out.view(b, n, v)

    def step(self, tokens, positions, write_index, attn_mask, keys, values, cache_write=inplace_cache_write):  # type: ignore[override]
        """The `token_two_heads` step over q fed tokens: (right logits [B, q, V], below logits [B, q, V], keys,
        values); inputs as LlamaGen's `step` (the cache spans all n_layer + medusa_attention_num blocks)."""
        h = self.embed_tokens(tokens)
        cos, sin = self.rope(positions)
        new_keys, new_values = [], []
        right = h
        for i, (layer, pk, pv) in enumerate(zip(self.layers, keys, values)):
            h, k, v = layer.forward_step(h, cos, sin, write_index, attn_mask, pk, pv, cache_write)
            new_keys.append(k)
            new_values.append(v)
            if i == self.cfg.n_layer - 1:
                right = h
        r, d = self.heads(right, h)
        return r, d, new_keys, new_values


# -- catalog: NAR's released class-conditional models --------------------------------------------
# size -> (n_layer, n_head, dim) of the reference's GPT_models (gpt.py GPT_B .. GPT_XXL); each adds
# medusa_attention_num = 1 block and the below head. Released on LlamaGen's VQ-16 at 256 px
# (huggingface.co/chenfeng1271, e.g. NAR-imagenet-256-B `last_version.pt`, a DDP checkpoint's `model` entry).
NAR_SIZES = {"B": (12, 12, 768), "M": (18, 16, 1024), "L": (24, 16, 1024), "XL": (36, 20, 1280), "XXL": (48, 24, 1536)}


class NARCatalog(Catalog):
    """`nar-{B,M,L,XL,XXL}`: NAR's class-conditional checkpoints on LlamaGen's tokenizer (256 px)."""

    family = "nar"
    config_class = NARConfig
    checkpoint_marker = "medusa_output."
    refines = "llamagen"  # its checkpoints also hold every LlamaGen parameter name
    hint = "nar-B|nar-M|nar-L|nar-XL|nar-XXL"

    def names(self):
        return [f"nar-{s}" for s in NAR_SIZES]

    def canonical(self, name):
        low = name.lower().replace("_", "-")
        for size in NAR_SIZES:
            if low in (f"nar-{size.lower()}", f"nar-imagenet-256-{size.lower()}"):
                return f"nar-{size}"
        return None

    def base_config(self, name, image_size):
        n_layer, n_head, dim = NAR_SIZES[name[len("nar-"):]]
        if image_size not in (None, 256):
            raise ArexportError(f"{name} is released at 256 px (a 16 x 16 grid); got --image-size {image_size}")
        # sample_c2i.py's defaults: constant guidance 4.0, top-k 2000, temperature 1, top-p 1
        return NARConfig(dim=dim, n_layer=n_layer, n_head=n_head, grid_size=16,
                         extra={"sampling_defaults": {"cfg_scale": 4.0, "top_k": 2000, "top_p": 1.0, "temperature": 1.0,
                                                      "cfg_schedule": "constant"}})


CATALOG = NARCatalog()
