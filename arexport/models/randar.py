"""RandAR (ziqipang/RandAR `RandAR/model/randar_gpt.py`): a decoder-only GPT generating image tokens
in a random order, each announced by a position-instruction token (see arexport.families.randar and
runtime/methods/randar.py for the decoding side).

Parameters are LlamaGen's (`tok_embeddings`, `cls_embedding.embedding_table`, `layers.N.attention.wqkv`,
...) plus `pos_instruct_embeddings` [1, dim]: one learned vector that, split into heads and rotated by the
2D RoPE of a grid position, is the instruction "the next token goes to that position".

Token space of the step graph: [0, V) image tokens, [V, V + C) class tokens (C = num_classes + 1, the
null class last), V + C the position-instruction token. The step graph is the plain `token` kind: an
instruction token takes its embedding from the position it is fed at (the graph rotates the learned
vector by that position's RoPE rows), so no step kind of its own is needed.

Teacher forcing (`forward`) lays a sequence out as the reference trains it: [class, P_0, z_0, P_1, z_1,
..., P_{N-1}] (P_i the instruction for order[i], z_i its token, both at grid position order[i]) under a
plain causal mask; the logits of P_i predict z_i.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn

from arexport.errors import ArexportError
from arexport.format.spec import ModelSpec
from arexport.models.catalog import Catalog
from arexport.models.llamagen import LLAMAGEN_SIZES, LlamaGen, LlamaGenConfig, inplace_cache_write


@dataclass(frozen=True)
class RandARConfig(LlamaGenConfig):
    """LlamaGen's ModelArgs as RandARTransformer takes them (class-conditional, one class token)."""

    def __post_init__(self):
        super().__post_init__()
        if self.model_type != "c2i" or self.cls_token_num != 1:
            raise ValueError("RandAR models here are class-conditional with one class token (model_type c2i)")
        if self.class_dropout_prob <= 0:
            raise ValueError("RandAR needs the null class row (class_dropout_prob > 0) for guidance")

    @property
    def class_rows(self) -> int:
        return self.num_classes + 1

    def build(self) -> "RandAR":
        return RandAR(self)

    def spec(self, name: str, image_size: Optional[int] = None) -> ModelSpec:
        base = super().spec(name, image_size)
        return replace(base, family="randar", extra={**base.extra, "class_token_offset": self.vocab_size,
                                                     "instruction_token": self.vocab_size + self.class_rows})


class RandAR(LlamaGen):
    """RandAR transformer: LlamaGen's layers and cache, position-instruction tokens."""

    @property
    def step_kinds(self) -> tuple[str, ...]:
        return ("token",)

    def __init__(self, cfg: RandARConfig):
        super().__init__(cfg)
        self.pos_instruct_embeddings = nn.Parameter(torch.zeros(1, cfg.dim))

    def init_random(self, seed: int = 0, std: float = 0.02) -> "RandAR":
        super().init_random(seed, std)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            self.pos_instruct_embeddings.copy_(torch.randn(1, self.cfg.dim, generator=g) * std)
        return self

    @property
    def instruction_id(self) -> int:
        return self.cfg.vocab_size + self.cfg.class_rows

    def instruction_embeddings(self, positions: torch.Tensor) -> torch.Tensor:
        """The instruction vector for grid positions [B, q]: split into heads, each interleaved pair
        rotated (in fp32) by that position's RoPE angle: [B, q, dim] in the model's dtype."""
        cfg = self.cfg
        idx = positions + 1  # row 0: the condition (zero) row of the RoPE tables
        cos, sin = self.rope_cos[idx].unsqueeze(2), self.rope_sin[idx].unsqueeze(2)  # [B, q, 1, D/2]
        x = self.pos_instruct_embeddings.float().view(1, 1, cfg.n_head, cfg.head_dim // 2, 2)
        x0, x1 = x[..., 0], x[..., 1]
        out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)  # [B, q, H, D/2, 2]
        return out.reshape(*positions.shape, cfg.dim).to(self.pos_instruct_embeddings.dtype)

    def embed_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [B, q] in RandAR's token space at grid positions [B, q] -> [B, q, dim]."""
        q_id = self.instruction_id
        plain = self.embed_tokens(torch.minimum(tokens, tokens.new_tensor(q_id - 1)))  # Min: TensorRT has no integer Clip
        instr = self.instruction_embeddings(torch.maximum(positions, positions.new_zeros(())))
        return torch.where((tokens == q_id).unsqueeze(-1), instr.to(plain.dtype), plain)

    def step(self, tokens, positions, write_index, attn_mask, keys, values, cache_write=inplace_cache_write):  # type: ignore[override]
        """LlamaGen's `token` step with instruction tokens embedded at their positions."""
        return self._run_layers(self.embed_step(tokens, positions), positions, write_index, attn_mask, keys, values,
                                cache_write, last_only=False)

    def forward(self, classes: torch.Tensor, seq: torch.Tensor, order: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Teacher forcing: classes [B] (num_classes = null), seq [B, N] image tokens in generation order,
        order [B, N] their grid positions; logits [B, N, V] fp32, row i predicting seq[:, i]."""
        b, n = seq.shape
        dev = seq.device
        instr = torch.full_like(seq, self.instruction_id)
        tokens = torch.stack([instr, seq], 2).reshape(b, 2 * n)[:, :-1]  # P_0, z_0, ..., P_{N-1}
        pos = torch.stack([order, order], 2).reshape(b, 2 * n)[:, :-1]
        tokens = torch.cat([classes[:, None] + self.cfg.vocab_size, tokens], 1)
        pos = torch.cat([torch.full((b, 1), -1, device=dev, dtype=pos.dtype), pos], 1)
        h = self.tok_dropout(self.embed_step(tokens, pos))
        cos, sin = self.rope(pos)
        for layer in self.layers:
            h = layer.forward_full(h, cos, sin, None, True)
        return self.output(self.norm(h[:, 1::2])).float()


# -- catalog: RandAR's released models -----------------------------------------------------------
# name -> (LlamaGen size, optimal guidance of the README's table); both on LlamaGen's VQ-16 at 256 px
RANDAR_MODELS = {"L": ("L", 3.4), "XL": ("XL", 4.0)}


class RandARCatalog(Catalog):
    """`randar-{L,XL}`: the released RandAR checkpoints on LlamaGen's tokenizer (256 px)."""

    family = "randar"
    config_class = RandARConfig
    checkpoint_marker = "pos_instruct_embeddings"
    refines = "llamagen"  # its checkpoints also hold every LlamaGen parameter name
    hint = "randar-L|randar-XL"

    def names(self):
        return [f"randar-{s}" for s in RANDAR_MODELS]

    def canonical(self, name):
        low = name.lower().replace("_", "-")
        for key, alias in (("L", "randar-l-0.3b"), ("XL", "randar-xl-0.7b")):
            if low in (f"randar-{key.lower()}", alias):
                return f"randar-{key}"
        return None

    def base_config(self, name, image_size):
        size, cfg_scale = RANDAR_MODELS[name[len("randar-"):]]
        n_layer, n_head, dim = LLAMAGEN_SIZES[size]
        if image_size not in (None, 256):
            raise ArexportError(f"{name} is released at 256 px (a 16 x 16 grid); got --image-size {image_size}")
        return RandARConfig(dim=dim, n_layer=n_layer, n_head=n_head, grid_size=16,
                            extra={"sampling_defaults": {"cfg_scale": cfg_scale, "top_k": 0, "top_p": 1.0,
                                                         "temperature": 1.0, "cfg_schedule": "linear"}})


CATALOG = RandARCatalog()
