"""ARPG: randomized parallel decoding (hp-l33/ARPG `models/arpg.py`), with a static-cache step function.

Two passes. Pass 1, the self-decoder half (n_layer/2 blocks), is a causal transformer over the
tokens sampled so far, each block with its own KV cache; a final norm and global `to_k`/`to_v`
turn its output into one shared K/V (RoPE of each token's own position). Pass 2, the
cross-decoder half, runs *mask-token queries* that carry the RoPE of their *target* positions
against that shared K/V, and the head predicts those targets. So one step takes the newly sampled
tokens (written into the caches) plus m query positions, and returns logits for the m queries.

Token space (one embedding table): [0, V) image tokens, V the mask token, V+1+c class c,
V+1+num_classes the null class (CFG), V+2+num_classes an unused "none" token. Condition position
is RoPE row 0 (zeros), as in LlamaGen. At inference the tokens added in one step see each other
and everything before them (no causal mask inside a step); the queries see every committed token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from arexport.models.catalog import Catalog
from arexport.models.fused import live_slots
from arexport.models.llamagen import CacheWrite, FeedForward, Fp32RopeTables, RMSNorm, SwiGLUDims, inplace_cache_write, normal_init_
from arexport.models.rope import apply_rope, rope_table_2d
from arexport.format.spec import ImageSpec, ModelSpec, s_max_for


@dataclass(frozen=True)
class ARPGConfig(SwiGLUDims):
    """ARPG hyper-parameters (names follow the reference ModelArgs)."""

    dim: int
    n_layer: int
    n_head: int
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    vocab_size: int = 16384
    grid_size: int = 16
    image_kind: str = "vq16"
    token_dropout_p: float = 0.0
    resid_dropout_p: float = 0.0
    ffn_dropout_p: float = 0.0
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        self._check_dims()
        if self.n_layer % 2:
            raise ValueError(f"ARPG needs an even n_layer (self- and cross-decoder halves), got {self.n_layer}")

    @property
    def kv_heads(self) -> int:
        return self.n_head

    @property
    def mask_token(self) -> int:
        return self.vocab_size

    @property
    def cond_len(self) -> int:
        return 1

    def spec(self, name: str, image_size: int | None = None) -> ModelSpec:
        cb = 8 if self.image_kind == "vq16" else 2
        return ModelSpec(
            name=name, family="arpg", model_type="c2i", vocab_size=self.vocab_size, n_tokens=self.n_tokens,
            grid_size=self.grid_size, cond_len=1, num_classes=self.num_classes, caption_dim=0,
            n_layer=self.n_layer, n_head=self.n_head, n_kv_head=self.n_head, head_dim=self.head_dim, dim=self.dim,
            n_cache_layers=self.n_layer // 2 + 1, s_max=s_max_for(1, self.n_tokens),
            image=ImageSpec(self.image_kind, self.grid_size, image_size or self.grid_size * 16, cb),
            extra={**self.extra, "class_token_offset": self.vocab_size + 1},
        )

    def build(self) -> "ARPG":
        return ARPG(self)


class _Attention(nn.Module):
    """Self-attention of the first half: to_q/to_k/to_v/proj, no biases."""

    def __init__(self, cfg: ARPGConfig, cross: bool = False):
        super().__init__()
        self.n_head, self.head_dim, self.dim = cfg.n_head, cfg.head_dim, cfg.dim
        self.to_q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        if not cross:
            self.to_k = nn.Linear(cfg.dim, cfg.dim, bias=False)
            self.to_v = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.proj_drop = nn.Dropout(cfg.resid_dropout_p)

    def heads(self, x):
        b, l, _ = x.shape
        return x.view(b, l, self.n_head, self.head_dim)

    def out(self, o):
        b, _, l, _ = o.shape
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, l, self.dim)))


class _Block(nn.Module):
    """Pre-norm attention + SwiGLU block; self- and cross-decoder blocks differ only in where K/V come from."""

    def __init__(self, cfg: ARPGConfig, cross: bool):
        super().__init__()
        self.attn = _Attention(cfg, cross=cross)
        self.ffn = FeedForward(cfg)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def finish(self, x, o):
        """Residuals around the attention output `o` and the feed-forward."""
        h = x + self.attn.out(o)
        return h + self.ffn(self.ffn_norm(h))


class SelfDecoder(_Block):
    def __init__(self, cfg: ARPGConfig):
        super().__init__(cfg, cross=False)

    def qkv(self, x, cos, sin):
        a = self.attn
        h = self.attn_norm(x)
        q = apply_rope(a.heads(a.to_q(h)).transpose(1, 2), cos, sin)
        k = apply_rope(a.heads(a.to_k(h)).transpose(1, 2), cos, sin)
        v = a.heads(a.to_v(h)).transpose(1, 2)
        return q, k, v


class CrossDecoder(_Block):
    def __init__(self, cfg: ARPGConfig):
        super().__init__(cfg, cross=True)

    def forward(self, q_in, k, v, cos, sin, mask, is_causal=False):
        a = self.attn
        q = apply_rope(a.heads(a.to_q(self.attn_norm(q_in))).transpose(1, 2), cos, sin)
        return self.finish(q_in, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal))


class _Layers(nn.Module):
    """Reference name `layers`: self_dec, cross_dec, norm, to_k, to_v."""

    def __init__(self, cfg: ARPGConfig):
        super().__init__()
        self.self_dec = nn.ModuleList([SelfDecoder(cfg) for _ in range(cfg.n_layer // 2)])
        self.cross_dec = nn.ModuleList([CrossDecoder(cfg) for _ in range(cfg.n_layer // 2)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.to_k = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.to_v = nn.Linear(cfg.dim, cfg.dim, bias=False)


class ARPG(Fp32RopeTables, nn.Module):
    """ARPG transformer with a multi-query step function over static caches."""

    STEP_WEIGHTS = ("layers.", "norm.", "head.")  # parameters every step reads in full (bandwidth model)
    step_kinds = ("multi_query",)  # the step kinds (arexport.format.stepkinds) this model implements

    def __init__(self, cfg: ARPGConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size + 1 + cfg.num_classes + 1 + 1, cfg.dim)
        self.embed_drop = nn.Dropout(cfg.token_dropout_p)
        self.layers = _Layers(cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_table_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_random(self, seed: int = 0, std: float = 0.02) -> "ARPG":
        normal_init_(self, torch.Generator().manual_seed(seed), std)
        return self

    def rope(self, positions):
        idx = positions + 1
        return self.rope_cos[idx].unsqueeze(2), self.rope_sin[idx].unsqueeze(2)

    def class_tokens(self, classes: torch.Tensor) -> torch.Tensor:
        """Class ids (num_classes = null) -> token ids."""
        return classes + self.cfg.vocab_size + 1

    # -- teacher forcing in a given order --------------------------------------------------------
    def forward(self, classes: torch.Tensor, tokens: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Logits [B, N, V]: query i predicts tokens[order[i]] from the condition and tokens[order[:i]]."""
        b, n = tokens.shape
        shuffled = tokens.gather(1, order)
        inputs = torch.cat([self.class_tokens(classes)[:, None], shuffled[:, :-1]], 1)
        in_pos = torch.cat([torch.full((b, 1), -1, device=tokens.device), order[:, :-1]], 1)
        x = self.embed_drop(self.embeddings(inputs))
        cos, sin = self.rope(in_pos)
        for layer in self.layers.self_dec:
            q, k, v = layer.qkv(x, cos, sin)
            x = layer.finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))
        gk, gv = self._global_kv(x, cos, sin)
        qcos, qsin = self.rope(order)
        h = self.embeddings(torch.full((b, n), self.cfg.mask_token, device=tokens.device))
        for layer in self.layers.cross_dec:
            h = layer(h, gk, gv, qcos, qsin, None, is_causal=True)
        return self.head(self.norm(h)).float()

    def _global_kv(self, x, cos, sin):
        xn = self.layers.norm(x)
        b, l, _ = x.shape
        heads = lambda t: t.view(b, l, self.cfg.n_head, self.cfg.head_dim)  # noqa: E731
        k = apply_rope(heads(self.layers.to_k(xn)).transpose(1, 2), cos, sin)
        v = heads(self.layers.to_v(xn)).transpose(1, 2)
        return k, v

    # -- multi-query step ---------------------------------------------------------------------------
    def step(self, tokens, positions, write_index, attn_mask, query_positions, query_mask, keys, values,
             cache_write: CacheWrite = inplace_cache_write):
        """tokens/positions [B,n] (new tokens, condition = class token at -1), query_positions [B,m];
        attn_mask [B,1,n,S], query_mask [B,1,m,S]; keys/values: n_layer/2 self-decoder buffers + 1
        global buffer. Returns logits [B,m,V] fp32 and the updated buffers."""
        x = self.embeddings(tokens)
        cos, sin = self.rope(positions)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers.self_dec):
            q, k, v = layer.qkv(x, cos, sin)
            kk = cache_write(keys[i], k, write_index)
            vv = cache_write(values[i], v, write_index)
            x = layer.finish(x, F.scaled_dot_product_attention(q, live_slots(kk, attn_mask), live_slots(vv, attn_mask),
                                                               attn_mask=attn_mask))
            new_k.append(kk)
            new_v.append(vv)
        gk, gv = self._global_kv(x, cos, sin)
        gk = cache_write(keys[-1], gk, write_index)
        gv = cache_write(values[-1], gv, write_index)
        new_k.append(gk)
        new_v.append(gv)
        b, m = query_positions.shape
        qcos, qsin = self.rope(query_positions)
        h = self.embeddings(torch.full((b, m), self.cfg.mask_token, dtype=torch.long, device=tokens.device))
        for layer in self.layers.cross_dec:
            h = layer(h, live_slots(gk, query_mask), live_slots(gv, query_mask), qcos, qsin, query_mask)
        return self.head(self.norm(h)).float(), new_k, new_v


# -- catalog: ARPG's released models -------------------------------------------------------------
ARPG_SIZES = {"L": (24, 16, 1024), "XL": (36, 20, 1280), "XXL": (48, 24, 1536)}  # (n_layer, n_head, dim) of its configs


class ARPGCatalog(Catalog):
    """`arpg-{L,XL,XXL}`: random-order parallel decoding."""

    family = "arpg"
    config_class = ARPGConfig
    checkpoint_marker = "layers.cross_dec."
    hint = "arpg-L|arpg-XL|arpg-XXL"

    def names(self):
        return [f"arpg-{s}" for s in ARPG_SIZES]

    def canonical(self, name):
        return f"arpg-{name[5:].upper()}" if name.lower().startswith("arpg-") and name[5:].upper() in ARPG_SIZES else None

    def base_config(self, name, image_size):
        n_layer, n_head, dim = ARPG_SIZES[name.split("-")[1]]
        return ARPGConfig(dim=dim, n_layer=n_layer, n_head=n_head, grid_size=(image_size or 256) // 16)


CATALOG = ARPGCatalog()
