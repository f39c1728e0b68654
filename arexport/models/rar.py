"""RAR (bytedance/1d-tokenizer `modeling/rar.py`): a raster class-to-image transformer with adaLN,
with a static-cache step function.

Facts kept from the reference (inference in raster order, as its `generate` samples):

* Sequence: a learned `cls_token`, the condition token, then image tokens. One embedding table
  holds [0, V) image tokens, V the mask token, V+1+c class c and V+1+C the "none" class (CFG).
* Each input adds `pos_embed[j]` (j = index in the sequence) and a *target-aware* embedding: the
  `target_aware_pos_embed` row of the image token that position predicts (zero for the cls token
  and for the last image token, which predicts nothing).
* Every block is pre-LayerNorm (eps 1e-6) attention + GELU MLP, modulated adaLN-zero style by
  `c_j = embed(condition) + timesteps_embeddings[j]`: shift/scale/gate for both halves.
  Attention has a fused biased `qkv`, LayerNorm on q and k per head (qk-norm), a biased `proj`.
* The head is `adaln_before_head` (affine-free LayerNorm modulated by c_j, scale chunk first) then
  a biased `lm_head` over the V image tokens.

Step function (`step`, traced by the exporter): positions are -2 for the cls slot, -1 for the
condition, i >= 0 for image token i, so slot j of the cache holds sequence index j. Every step
needs the condition vector, which the reference recomputes from the condition id each call. Here
the condition is fed once (at prefill) and kept in the cache: buffer n_layer (one K/V pair past the
blocks') stores `embed(condition)` at every slot it writes, and later steps read slot 0. So the
graph signature is the shared (tokens, positions, write_index, mask, caches) one; the price is one
extra cache layer (1/n_layer more cache memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from arexport.format.spec import ImageSpec, ModelSpec, s_max_for
from arexport.models.catalog import Catalog
from arexport.models.fused import live_slots
from arexport.models.llamagen import CacheWrite, TransformerDims, inplace_cache_write

POS_TABLE_EXTRA = 1024  # the reference sizes pos_embed / target_aware_pos_embed n + 1024 rows
TIMESTEP_TABLE_EXTRA = 100  # and timesteps_embeddings n + 100 rows


@dataclass(frozen=True)
class RARConfig(TransformerDims):
    """RAR hyper-parameters (the reference's config.model.generator / vq_model fields)."""

    dim: int  # hidden_size
    n_layer: int  # num_hidden_layers
    n_head: int = 16  # num_attention_heads
    intermediate_size: int = 3072
    num_classes: int = 1000  # condition_num_classes
    vocab_size: int = 1024  # vq_model.codebook_size
    grid_size: int = 16  # image_seq_len = grid_size ** 2
    image_kind: str = "maskgit"
    dropout: float = 0.0  # training-time (the reference trains with 0.1); identity in eval
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        self._check_dims(("intermediate_size", "vocab_size", "num_classes"), rope_2d=False)  # no RoPE in RAR

    def build(self) -> "RAR":
        return RAR(self)

    def spec(self, name: str, image_size: int | None = None) -> ModelSpec:
        codebook_dim = 256 if self.image_kind == "maskgit" else 2
        return ModelSpec(
            name=name, family="rar", model_type="c2i", vocab_size=self.vocab_size, n_tokens=self.n_tokens,
            grid_size=self.grid_size, cond_len=2, num_classes=self.num_classes, caption_dim=0,
            n_layer=self.n_layer, n_head=self.n_head, n_kv_head=self.n_head, head_dim=self.head_dim, dim=self.dim,
            n_cache_layers=self.n_layer + 1, s_max=s_max_for(2, self.n_tokens),
            image=ImageSpec(self.image_kind, self.grid_size, image_size or self.grid_size * 16, codebook_dim),
            extra={**self.extra, "class_token_offset": self.vocab_size + 1},
        )


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Mlp(nn.Module):
    """timm's Mlp as the reference configures it: fc1, exact GELU, fc2 (dropouts identity in eval)."""

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, cfg: RARConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=True)
        self.q_norm = nn.LayerNorm(cfg.head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(cfg.head_dim, eps=1e-6)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def qkv_heads(self, x):
        """x [B,L,dim] -> q, k (normed), v: [B,H,L,D]."""
        b, l, _ = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def out(self, o):
        b, _, l, _ = o.shape
        return self.drop(self.proj(o.transpose(1, 2).reshape(b, l, -1)))


class Block(nn.Module):
    def __init__(self, cfg: RARConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.mlp = Mlp(cfg.dim, cfg.intermediate_size, cfg.dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))

    def forward(self, x, c, attend):
        """x [B,L,dim], c [B,L,dim]; attend(q, k, v) -> attention output [B,H,L,D]."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        q, k, v = self.attn.qkv_heads(modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_a * self.attn.out(attend(q, k, v))
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        scale, shift = self.adaLN_modulation(c).chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)


class RAR(nn.Module):
    """RAR transformer (parameter names as in the released rar_*.bin) with a static-cache step function."""

    STEP_WEIGHTS = ("blocks.", "adaln_before_head.", "lm_head.")  # parameters every step reads in full (bandwidth model)
    step_kinds = ("token",)  # the step kinds (arexport.format.stepkinds) this model implements

    def __init__(self, cfg: RARConfig):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.n_tokens, cfg.dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.embeddings = nn.Embedding(cfg.vocab_size + 1 + cfg.num_classes + 1, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, n + POS_TABLE_EXTRA, d))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, n + POS_TABLE_EXTRA, d))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, n + TIMESTEP_TABLE_EXTRA, d))
        self.adaln_before_head = FinalLayer(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size)

    def to_precision(self, device=None, dtype=None):
        return self.to(device=device, dtype=dtype)

    def init_random(self, seed: int = 0, std: float = 0.02) -> "RAR":
        """Every parameter ~ N(0, std), then LayerNorm weights 1 + N(0, std). Unlike the reference's
        adaLN-zero init the modulation and head layers are random too, so random-weight models
        exercise every term (parity and latency work)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)
            for m in self.modules():
                if isinstance(m, nn.LayerNorm) and m.weight is not None:
                    m.weight.add_(1.0)
        return self

    # -- embeddings -----------------------------------------------------------------------------
    def target_aware_table(self) -> torch.Tensor:
        """[n + 2, dim]: row j = target-aware embedding added at sequence index j (zero at 0 and n + 1)."""
        n = self.cfg.n_tokens
        ta = self.target_aware_pos_embed[0, 2:n + 2]
        zero = torch.zeros_like(ta[:1])
        return torch.cat([zero, ta, zero])

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows of the one embedding table (image tokens, mask, classes, none)."""
        return self.embeddings(torch.minimum(torch.maximum(tokens, tokens.new_zeros(())), tokens.new_tensor(self.embeddings.num_embeddings - 1)))

    def inputs(self, e: torch.Tensor, seq_index: torch.Tensor) -> torch.Tensor:
        """Looked-up rows at sequence indices (0 = the cls slot, which takes cls_token) -> input vectors."""
        e = torch.where((seq_index == 0).unsqueeze(-1), self.cls_token.to(e.dtype), e)
        return e + self.pos_embed[0, seq_index] + self.target_aware_table()[seq_index]

    def head(self, h, c):
        return self.lm_head(self.adaln_before_head(h, c)).float()

    # -- teacher forcing (the reference that cached decoding is tested against) ----------------------
    def forward(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """cond: condition token ids [B] (class + V + 1, or the none id); tokens [B, n] raster.
        Returns logits [B, n, V] fp32, row i predicting image token i (the last token is not fed)."""
        b, n = tokens.shape
        ids = torch.cat([torch.zeros_like(cond)[:, None], cond[:, None], tokens[:, :-1]], 1)
        j = torch.arange(ids.shape[1], device=ids.device).expand(b, -1)
        e = self.lookup(ids)
        h = self.inputs(e, j)
        c = e[:, 1:2] + self.timesteps_embeddings[0, j]  # the condition row, at every position
        for blk in self.blocks:
            h = blk(h, c, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return self.head(h, c)[:, 1:]

    # -- step function -------------------------------------------------------------------------------
    def step(self, tokens, positions, write_index, attn_mask, keys, values, cache_write: CacheWrite = inplace_cache_write):
        """One step over q new inputs: logits [B,q,V] fp32 and the (updated) cache buffers.

        tokens [B,q] int64; positions [B,q] int64 (-2 cls slot, -1 condition, i image token i);
        write_index [B] first cache slot; attn_mask [B,1,q,S] bool; keys/values: n_layer + 1 buffers
        [B,H,S,D] (the last pair stores the condition vector, see the module docstring).
        """
        b, q = tokens.shape
        j = positions + 2
        fed = self.lookup(tokens)
        h = self.inputs(fed, j)
        is_cond = (positions == -1).unsqueeze(-1)
        stored = keys[-1][:, :, 0, :].reshape(b, 1, -1).to(h.dtype)
        cond = torch.where(is_cond.any(1, keepdim=True), (fed * is_cond).sum(1, keepdim=True), stored)  # [B,1,dim]
        c = cond + self.timesteps_embeddings[0, j]
        new_keys, new_values = [], []
        for blk, pk, pv in zip(self.blocks, keys, values):
            def attend(qh, kh, vh, pk=pk, pv=pv):
                k_all = cache_write(pk, kh, write_index)
                v_all = cache_write(pv, vh, write_index)
                new_keys.append(k_all)
                new_values.append(v_all)
                return F.scaled_dot_product_attention(qh, live_slots(k_all, attn_mask).to(qh.dtype),
                                                      live_slots(v_all, attn_mask).to(qh.dtype), attn_mask=attn_mask)
            h = blk(h, c, attend)
        store = cond.view(b, self.cfg.n_head, 1, self.cfg.head_dim).expand(b, self.cfg.n_head, q, self.cfg.head_dim)
        new_keys.append(cache_write(keys[-1], store, write_index))
        new_values.append(cache_write(values[-1], store, write_index))
        return self.head(h, c), new_keys, new_values


# -- catalog: RAR's released models --------------------------------------------------------------
# RAR sizes (num_hidden_layers, hidden_size, intermediate_size; 16 heads) and the sampler each
# was evaluated with (randomize_temperature, guidance_scale, guidance_scale_pow), from README_RAR.md.
RAR_SIZES = {"b": (24, 768, 3072), "l": (24, 1024, 4096), "xl": (32, 1280, 5120), "xxl": (40, 1408, 6144)}
RAR_SAMPLERS = {"b": (1.0, 16.0, 2.75), "l": (1.02, 15.5, 2.5), "xl": (1.02, 6.9, 1.5), "xxl": (1.02, 8.0, 1.2)}


class RARCatalog(Catalog):
    """`rar-{b,l,xl,xxl}` (aliases rar_b, ...) with the MaskGIT-VQGAN tokenizer."""

    family = "rar"
    config_class = RARConfig
    checkpoint_marker = "timesteps_embeddings"
    hint = "rar-b|rar-l|rar-xl|rar-xxl"

    def names(self):
        return [f"rar-{s}" for s in RAR_SIZES]

    def canonical(self, name):
        low = name.lower()
        return f"rar-{low[4:]}" if low.replace("_", "-").startswith("rar-") and low[4:] in RAR_SIZES else None

    def base_config(self, name, image_size):
        size = name[4:]
        n_layer, dim, ffn = RAR_SIZES[size]
        temperature, g, power = RAR_SAMPLERS[size]
        sampler = {"cfg_scale": g, "cfg_schedule": "cosine", "cfg_power": power, "temperature": temperature,
                   "top_k": 0, "top_p": 1.0}
        return RARConfig(dim=dim, n_layer=n_layer, n_head=16, intermediate_size=ffn, grid_size=(image_size or 256) // 16,
                         extra={"sampling_defaults": sampler})


CATALOG = RARCatalog()
