"""LPD (mit-han-lab/lpd `models/lpd.py`, "Locality-aware Parallel Decoding"): a ViT-style decoder
(pre-LayerNorm blocks with biased qkv and a GELU MLP, learned absolute position table) that predicts
groups of tokens from learnable position-query tokens (see arexport.families.lpd and
runtime/methods/lpd.py for the decoding side).

Parameters as the released lpd_*.pth hold them: `class_emb`, `token_emb`, `fake_latent` (the null
class), `pos_embed` [1, 1 + N, dim] (row 0 the class slot), `z_proj_ln`, `mask_token` (the query),
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, `head`.

Every input is LayerNorm(z_proj_ln)(embedding + pos_embed[1 + grid position]) (row 0 for the class).
Token space of the step graph: [0, V) image tokens, [V, V + C) class tokens (C = num_classes + 1, the
last the null class `fake_latent`), V + C the position query. Positions are raster grid indices,
-1 for the class token. The step graph is the plain `token` kind with the runtime's mask (a group's
queries see each other), so LPD needs no step kind of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from arexport.errors import ArexportError
from arexport.format.spec import ImageSpec, ModelSpec, s_max_for
from arexport.models.catalog import Catalog
from arexport.models.llamagen import TransformerDims, inplace_cache_write


@dataclass(frozen=True)
class LPDConfig(TransformerDims):
    """LPD's constructor arguments (decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio 4)."""

    dim: int = 1024
    n_layer: int = 24
    n_head: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    vocab_size: int = 16384
    grid_size: int = 16
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        self._check_dims(("vocab_size", "num_classes"), rope_2d=False)

    @property
    def hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)

    def build(self) -> "LPD":
        return LPD(self)

    def spec(self, name: str, image_size: Optional[int] = None) -> ModelSpec:
        return ModelSpec(
            name=name, family="lpd", model_type="c2i", vocab_size=self.vocab_size, n_tokens=self.n_tokens,
            grid_size=self.grid_size, cond_len=1, num_classes=self.num_classes, caption_dim=0,
            n_layer=self.n_layer, n_head=self.n_head, n_kv_head=self.n_head, head_dim=self.head_dim, dim=self.dim,
            n_cache_layers=self.n_layer, s_max=s_max_for(1, self.n_tokens),
            image=ImageSpec("vq16", self.grid_size, image_size or self.grid_size * 16, 8),
            extra={**self.extra, "class_token_offset": self.vocab_size,
                   "query_token": self.vocab_size + self.num_classes + 1},
        )


class Attention(nn.Module):
    def __init__(self, cfg: LPDConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=True)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def heads(self, x):
        """x [B, L, dim] -> q, k, v [B, H, L, D]."""
        b, l, _ = x.shape
        return self.qkv(x).view(b, l, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def out(self, o):
        b, _, l, _ = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, l, -1))


class Mlp(nn.Module):
    def __init__(self, cfg: LPDConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # timm Mlp with nn.GELU (exact erf)


class Block(nn.Module):
    """Pre-norm block (timm's Block without layer scale or drop path)."""

    def __init__(self, cfg: LPDConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.mlp = Mlp(cfg)

    def forward(self, h, attend):
        """attend(q, k, v) -> [B, H, L, D] over whatever keys the caller holds."""
        h = h + self.attn.out(attend(*self.attn.heads(self.norm1(h))))
        return h + self.mlp(self.norm2(h))


class LPD(nn.Module):
    """LPD transformer with a static-cache `token` step."""

    STEP_WEIGHTS = ("blocks.", "norm.", "head.")  # parameters every step reads in full (bandwidth model)
    step_kinds = ("token",)

    def __init__(self, cfg: LPDConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.class_emb = nn.Embedding(cfg.num_classes, d)
        self.token_emb = nn.Embedding(cfg.vocab_size, d)
        self.fake_latent = nn.Parameter(torch.zeros(1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.n_tokens + 1, d))
        self.z_proj_ln = nn.LayerNorm(d, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)

    def to_precision(self, device=None, dtype=None):
        return self.to(device=device, dtype=dtype)

    def init_random(self, seed: int = 0, std: float = 0.02) -> "LPD":
        """Every parameter ~ N(0, std), LayerNorm weights 1 + N(0, std): random-weight models exercise
        every term (the reference zero-inits biases and uses xavier for linears)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.add_(1.0)
        return self

    @property
    def query_id(self) -> int:
        return self.cfg.vocab_size + self.cfg.num_classes + 1

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [B, q] in LPD's token space at grid positions [B, q] (-1: class) -> inputs [B, q, dim]."""
        cfg = self.cfg
        v, c = cfg.vocab_size, cfg.num_classes
        img = self.token_emb(torch.minimum(tokens, tokens.new_tensor(v - 1)))  # Min/Max: TensorRT has no integer Clip
        cls = self.class_emb(torch.minimum(torch.maximum(tokens - v, tokens.new_zeros(())), tokens.new_tensor(c - 1)))
        d = img.shape[-1]
        e = torch.where((tokens >= v).unsqueeze(-1), cls, img)
        e = torch.where((tokens == v + c).unsqueeze(-1), self.fake_latent.view(1, 1, d).to(e.dtype), e)
        e = torch.where((tokens == self.query_id).unsqueeze(-1), self.mask_token.view(1, 1, d).to(e.dtype), e)
        return self.z_proj_ln(e + self.pos_embed[0, positions + 1])

    def forward(self, classes: torch.Tensor, seq: torch.Tensor, order: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
        """Teacher forcing as the reference trains: classes [B] (num_classes = null), seq [B, N] tokens in
        generation order, order [B, N] their grid positions, group sizes summing to N. Inputs: [class,
        z_0 .. z_{N - g_last - 1}] then the queries of every token [Q_0 .. Q_{N-1}]; context entries see
        their own group and earlier ones, queries their own group and the context before it.
        Logits [B, N, V] fp32, row i predicting seq[:, i]."""
        b, n = seq.shape
        if sum(group_sizes) != n or min(group_sizes) < 1:
            raise ArexportError(f"LPD group sizes must be >= 1 and sum to {n}, got {group_sizes}")
        dev = seq.device
        ctx_n = n - group_sizes[-1]
        cls_tok = classes[:, None] + self.cfg.vocab_size
        tokens = torch.cat([cls_tok, seq[:, :ctx_n], torch.full_like(seq, self.query_id)], 1)
        pos = torch.cat([torch.full((b, 1), -1, device=dev, dtype=order.dtype), order[:, :ctx_n], order], 1)
        h = self.embed(tokens, pos)
        mask = self.group_mask(group_sizes, dev)
        for blk in self.blocks:
            h = blk(h, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        return self.head(self.norm(h[:, -n:])).float()

    @staticmethod
    def group_mask(group_sizes: list[int], device=None) -> torch.Tensor:
        """[L, L] bool over [class, context groups 0 .. G-2, query groups 0 .. G-1]: context group a
        (the class is group -1) sees context groups <= a; query group j sees context groups < j and
        query group j."""
        ctx_group = torch.cat([torch.tensor([-1]), torch.repeat_interleave(torch.arange(len(group_sizes) - 1),
                                                                          torch.tensor(group_sizes[:-1]))])
        q_group = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
        nc = ctx_group.numel()
        m_cc = ctx_group[None, :] <= ctx_group[:, None]
        m_qc = ctx_group[None, :] < q_group[:, None]
        m_qq = q_group[None, :] == q_group[:, None]
        top = torch.cat([m_cc, torch.zeros(nc, q_group.numel(), dtype=torch.bool)], 1)
        return torch.cat([top, torch.cat([m_qc, m_qq], 1)], 0).to(device)

    def step(self, tokens, positions, write_index, attn_mask, keys, values, cache_write=inplace_cache_write):
        """One step over q inputs: logits [B, q, V] fp32 and the (updated) cache buffers.

        tokens [B, q] int64 (LPD's token space); positions [B, q] grid indices (-1: class); write_index [B]
        first cache slot; attn_mask [B, 1, q, S] bool; keys/values per layer [B, H, S, D]."""
        h = self.embed(tokens, positions)
        new_keys, new_values = [], []
        for blk, pk, pv in zip(self.blocks, keys, values):
            def attend(q, k, v, pk=pk, pv=pv):
                k_all = cache_write(pk, k, write_index)
                v_all = cache_write(pv, v, write_index)
                new_keys.append(k_all)
                new_values.append(v_all)
                return F.scaled_dot_product_attention(q, k_all.to(q.dtype), v_all.to(q.dtype), attn_mask=attn_mask)
            h = blk(h, attend)
        return self.head(self.norm(h)).float(), new_keys, new_values


# -- catalog: LPD's released models ---------------------------------------------------------------
# size -> (decoder_depth, decoder_num_heads, decoder_embed_dim) of lpd_{l,xl,xxl}; name -> guidance of
# its evaluation script at the fewest steps (scripts/eval/lpd_*_res*_steps{20,48}.sh, linear schedule)
LPD_SIZES = {"l": (24, 16, 1024), "xl": (36, 20, 1280), "xxl": (48, 24, 1536)}
LPD_MODELS = {"lpd-l-256": 4.8, "lpd-xl-256": 4.9, "lpd-xxl-256": 5.9, "lpd-l-512": 7.3, "lpd-xl-512": 6.0}
# name -> repulsion threshold of the order file its evaluation script reads (res*_steps*_repulsion{2,3,4}.json)
LPD_REPULSION = {"lpd-l-256": 2.0, "lpd-xl-256": 2.0, "lpd-xxl-256": 3.0, "lpd-l-512": 4.0, "lpd-xl-512": 4.0}


class LPDCatalog(Catalog):
    """`lpd-{l,xl,xxl}-256`, `lpd-{l,xl}-512` (aliases lpd_l_256, ...) on LlamaGen's VQ-16 tokenizer."""

    family = "lpd"
    config_class = LPDConfig
    checkpoint_marker = "z_proj_ln."
    hint = "lpd-l-256|lpd-xl-256|lpd-xxl-256|lpd-l-512|lpd-xl-512"

    def names(self):
        return list(LPD_MODELS)

    def canonical(self, name):
        low = name.lower().replace("_", "-")
        return low if low in LPD_MODELS else None

    def base_config(self, name, image_size):
        _, size, px = name.split("-")
        n_layer, n_head, dim = LPD_SIZES[size]
        if image_size not in (None, int(px)):
            raise ArexportError(f"{name} is released at {px} px; pass the model of that resolution instead of --image-size {image_size}")
        return LPDConfig(dim=dim, n_layer=n_layer, n_head=n_head, grid_size=int(px) // 16,
                         extra={"lpd_repulsion": LPD_REPULSION[name],
                                "sampling_defaults": {"cfg_scale": LPD_MODELS[name], "cfg_schedule": "linear", "top_k": 0,
                                                      "top_p": 1.0, "temperature": 1.0}})


CATALOG = LPDCatalog()
