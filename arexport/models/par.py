"""PAR (Epiphqny/PAR `autoregressive/models/gpt.py`): LlamaGen's GPT with transition tokens and a
region-interleaved generation order (see arexport.families.par for the decoding side).

Same parameters as LlamaGen (`tok_embeddings`, `cls_embedding.embedding_table`, `layers.N.attention.wqkv`,
...) plus `spe_tok_embeddings.special_embeddings` [k - 1, dim], the learned transition tokens. Token space
of the step graph: [0, V) image tokens, [V, V + C) class tokens (C = num_classes + 1, the null class
last), [V + C, V + C + k - 1) transition tokens. Positions are raster grid indices driving LlamaGen's 2D
RoPE (so PAR's position remapping is the runtime feeding each token's own grid position), -1 for the
class and transition tokens (zero RoPE, as the reference's zero rows for them).

Teacher forcing (`forward`) lays the sequence out as the reference trains it: [class, s_0 .. s_{k-1},
T_0 .. T_{k-2}, s_k .. s_{N-2}] in generation order s, under the group mask: causal, except that each
group of k positions from index k on sees its whole group. Output i predicts s_i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from arexport.errors import ArexportError
from arexport.families.par import par_order
from arexport.format.spec import ModelSpec
from arexport.models.catalog import Catalog
from arexport.models.llamagen import LlamaGen, LlamaGenConfig


@dataclass(frozen=True)
class PARConfig(LlamaGenConfig):
    """LlamaGen's ModelArgs plus PAR's `ar_token_num` (k, tokens per parallel step) and `spe_token_num`
    (k - 1 learned transition tokens)."""

    ar_token_num: int = 4
    spe_token_num: int = 3

    def __post_init__(self):
        super().__post_init__()
        if self.model_type != "c2i":
            raise ValueError("PAR models here are class-conditional (model_type c2i)")
        if self.class_dropout_prob <= 0:
            raise ValueError("PAR needs the null class row (class_dropout_prob > 0) for guidance")
        s = math.isqrt(self.ar_token_num)
        if self.ar_token_num < 4 or s * s != self.ar_token_num or self.grid_size % s:
            raise ValueError(f"ar_token_num must be a square >= 4 whose root divides grid_size={self.grid_size}, "
                             f"got {self.ar_token_num}")
        if self.spe_token_num != self.ar_token_num - 1:
            raise ValueError(f"spe_token_num must be ar_token_num - 1 = {self.ar_token_num - 1} (the reference's group "
                             f"size is spe_token_num + 1), got {self.spe_token_num}")
        if self.n_tokens < 2 * self.ar_token_num:
            raise ValueError(f"a {self.grid_size}x{self.grid_size} grid is too small for {self.ar_token_num} parallel tokens")

    @property
    def class_rows(self) -> int:
        return self.num_classes + 1

    def build(self) -> "PAR":
        return PAR(self)

    def spec(self, name: str, image_size: Optional[int] = None) -> ModelSpec:
        base = super().spec(name, image_size)
        from dataclasses import replace

        return replace(base, family="par", extra={**base.extra, "parallel_tokens": self.ar_token_num,
                                                  "class_token_offset": self.vocab_size,
                                                  "transition_token_offset": self.vocab_size + self.class_rows})


class SpecialTokenEmbedding(nn.Module):
    """Reference name `spe_tok_embeddings`: the k - 1 transition tokens."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.special_embeddings = nn.Embedding(n, dim)


class PAR(LlamaGen):
    """PAR transformer: LlamaGen's layers and `token` step, PAR's token space and teacher forcing."""

    @property
    def step_kinds(self) -> tuple[str, ...]:
        return ("token",)

    def __init__(self, cfg: PARConfig):
        super().__init__(cfg)
        self.spe_tok_embeddings = SpecialTokenEmbedding(cfg.spe_token_num, cfg.dim)
        self.register_buffer("order", par_order(cfg.grid_size, cfg.ar_token_num), persistent=False)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B,q] in PAR's token space -> [B,q,dim]."""
        cfg = self.cfg
        v, c = cfg.vocab_size, cfg.class_rows
        img = self.tok_embeddings(torch.minimum(tokens, tokens.new_tensor(v - 1)))  # Min/Max: TensorRT has no integer Clip
        cls = self.cls_embedding.embedding_table(torch.minimum(torch.maximum(tokens - v, tokens.new_zeros(())),
                                                               tokens.new_tensor(c - 1)))
        spe = self.spe_tok_embeddings.special_embeddings(torch.maximum(tokens - v - c, tokens.new_zeros(())))
        return torch.where((tokens >= v + c).unsqueeze(-1), spe, torch.where((tokens >= v).unsqueeze(-1), cls, img))

    def transition_ids(self, device=None) -> torch.Tensor:
        """Token ids of the transition tokens [k - 1]."""
        return self.cfg.vocab_size + self.cfg.class_rows + torch.arange(self.cfg.spe_token_num, device=device)

    def forward(self, classes: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Teacher forcing: classes [B] (num_classes = null), seq [B, N] image tokens in generation order
        (`self.order`); logits [B, N, V] fp32, row i predicting seq[:, i]."""
        cfg, k = self.cfg, self.cfg.ar_token_num
        b, n = seq.shape
        dev = seq.device
        trans = self.transition_ids(dev).expand(b, -1)
        tokens = torch.cat([classes[:, None] + cfg.vocab_size, seq[:, :k], trans, seq[:, k:n - 1]], 1)
        none = torch.full((b, 1), -1, device=dev)
        pos = self.order[:n].to(dev).expand(b, -1)
        positions = torch.cat([none, pos[:, :k], none.expand(b, k - 1), pos[:, k:n - 1]], 1)
        h = self.tok_dropout(self.embed_tokens(tokens))
        cos, sin = self.rope(positions)
        mask = self.group_mask(tokens.shape[1], k, dev)
        for layer in self.layers:
            h = layer.forward_full(h, cos, sin, mask, False)
        return self.output(self.norm(h)).float()[:, :n]

    @staticmethod
    def group_mask(length: int, k: int, device=None) -> torch.Tensor:
        """[L, L] bool: causal, and positions k + g k .. k + (g + 1) k - 1 see their whole group."""
        i = torch.arange(length, device=device)
        group_end = torch.where(i >= k, k + ((i - k) // k + 1) * k, i + 1)  # exclusive end of what row i sees
        return i[None, :] < group_end[:, None]


# -- catalog: PAR's released models ----------------------------------------------------------------
# name -> (LlamaGen size, k, guidance of the README's sampling command); all at 384 px (24 x 24 tokens)
PAR_MODELS = {"XL-4x": ("XL", 4, 1.5), "XXL-4x": ("XXL", 4, 1.435), "3B-4x": ("3B", 4, 1.345), "3B-16x": ("3B", 16, 1.5)}
PAR_SIZES = {"XL": (36, 20, 1280), "XXL": (48, 24, 1536), "3B": (24, 32, 3200)}  # (n_layer, n_head, dim)


class PARCatalog(Catalog):
    """`par-{XL-4x,XXL-4x,3B-4x,3B-16x}`: the released PAR checkpoints (384 px by default)."""

    family = "par"
    config_class = PARConfig
    checkpoint_marker = "spe_tok_embeddings."
    refines = "llamagen"  # its checkpoints also hold every LlamaGen parameter name
    hint = "par-XL-4x|par-XXL-4x|par-3B-4x|par-3B-16x"

    def names(self):
        return [f"par-{s}" for s in PAR_MODELS]

    def check_trained(self, name, cfg, args, path):
        """PAR's train_c2i.py records --ar-token-num and --spe-token-num: they must be the config's."""
        for key in ("ar_token_num", "spe_token_num"):
            have = args.get(key)
            if isinstance(have, int) and have != getattr(cfg, key):
                raise ArexportError(f"{path} was trained with --{key.replace('_', '-')} {have}; {name} has {getattr(cfg, key)}: "
                                    f"pass the model with that k (par-3B-16x is k = 16) or --model-config {key}={have}")

    def canonical(self, name):
        if not name.lower().startswith("par-"):
            return None
        key = {k.lower(): k for k in PAR_MODELS}.get(name[4:].lower())
        return f"par-{key}" if key else None

    def base_config(self, name, image_size):
        size, k, cfg_scale = PAR_MODELS[name[4:]]
        n_layer, n_head, dim = PAR_SIZES[size]
        return PARConfig(dim=dim, n_layer=n_layer, n_head=n_head, grid_size=(image_size or 384) // 16, ar_token_num=k,
                         spe_token_num=k - 1,
                         extra={"sampling_defaults": {"cfg_scale": cfg_scale, "top_k": 0, "top_p": 1.0, "temperature": 1.0,
                                                      "cfg_schedule": "constant"}})


CATALOG = PARCatalog()
