"""LlamaGen GPT (class- and text-conditional), faithful to FoundationVision/LlamaGen `gpt.py`.

Two entry points share the weights and per-layer math:

* `forward(cond, tokens)` — full-sequence teacher forcing with no cache (training and the
  independent reference that cache-based decoding is tested against);
* `step(tokens, positions, write_index, attn_mask, keys, values, cache_write)` — the step function
  the exporter traces and the torch backend runs: new tokens are written into static KV buffers at
  `write_index` and attend to the whole buffer under an explicit boolean mask.

Facts kept from the reference: pre-norm RMSNorm computed in fp32, SwiGLU FFN, fused `wqkv`, no
biases, untied `output` head with fp32 logits, 2D RoPE on interleaved pairs computed in fp32, and
zero RoPE (cos = sin = 0) for condition positions, which zeroes their q and k.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from arexport.models.catalog import Catalog
from arexport.models.fused import fused, live_slots
from arexport.models.rope import apply_rope, rope_table_2d, rotary_dtype
from arexport.format.spec import ImageSpec, ModelSpec, s_max_for

CacheWrite = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def find_multiple(n: int, k: int) -> int:
    """Round n up to a multiple of k (LlamaGen's FFN sizing rule)."""
    return n if n % k == 0 else n + k - (n % k)


def normal_init_(module: nn.Module, generator: torch.Generator, std: float) -> None:
    """In place: RMSNorm weights to 1, every other parameter ~ N(0, std^2), drawn in parameter order."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


class TransformerDims:
    """Sizes derived the same way by every transformer config here (mixin for frozen dataclasses)."""

    def _check_dims(self, more: tuple[str, ...] = (), rope_2d: bool = True) -> None:
        """Every size field >= 1, heads divide dim, and (2D RoPE) head_dim a multiple of 4."""
        for f in ("dim", "n_layer", "n_head", "grid_size") + more:
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} is not divisible by n_head={self.n_head}")
        if rope_2d and self.head_dim % 4:
            raise ValueError(f"head_dim={self.head_dim} must be a multiple of 4 for 2D RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def n_tokens(self) -> int:
        return self.grid_size * self.grid_size

    def with_overrides(self, **kw):
        """A copy with some fields replaced (validated again)."""
        return replace(self, **kw)


class SwiGLUDims(TransformerDims):
    """LlamaGen-style configs (LlamaGen, ARPG): the SwiGLU width rule on top of TransformerDims."""

    @property
    def ffn_hidden(self) -> int:
        """LlamaGen's SwiGLU width: find_multiple(int(2 * 4 * dim / 3) [* multiplier], multiple_of)."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)


@dataclass(frozen=True)
class LlamaGenConfig(SwiGLUDims):
    """Architecture hyper-parameters (names follow LlamaGen's ModelArgs)."""

    dim: int
    n_layer: int
    n_head: int
    n_kv_head: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    num_classes: int = 1000
    caption_dim: int = 2048
    class_dropout_prob: float = 0.1  # > 0 means the class table has a null row
    token_dropout_p: float = 0.0  # training-time dropouts (LlamaGen trains with 0.1); identity in eval
    resid_dropout_p: float = 0.0
    ffn_dropout_p: float = 0.0
    model_type: str = "c2i"
    vocab_size: int = 16384
    cls_token_num: int = 1
    grid_size: int = 16  # block_size = grid_size**2 image tokens
    image_kind: str = "vq16"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        self._check_dims()
        if self.model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type must be c2i or t2i, got {self.model_type!r}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.kv_heads}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def cond_len(self) -> int:
        return self.cls_token_num

    def build(self) -> "LlamaGen":
        return LlamaGen(self)

    def spec(self, name: str, image_size: int | None = None) -> ModelSpec:
        """The ModelSpec describing this config's step functions and image output."""
        if self.image_kind == "vq16":
            img = ImageSpec("vq16", self.grid_size, image_size or self.grid_size * 16, 8)
        else:
            img = ImageSpec(self.image_kind, self.grid_size, image_size or self.grid_size * 16, 2)
        return ModelSpec(
            name=name,
            family="llamagen",
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            n_tokens=self.n_tokens,
            grid_size=self.grid_size,
            cond_len=self.cond_len,
            num_classes=self.num_classes,
            caption_dim=self.caption_dim,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_kv_head=self.kv_heads,
            head_dim=self.head_dim,
            dim=self.dim,
            n_cache_layers=self.n_layer,
            s_max=s_max_for(self.cond_len, self.n_tokens),
            image=img,
            extra=dict(self.extra),
        )


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as LlamaGen does."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused() and x.dtype == self.weight.dtype:  # tracing an engine: one RMSNormalization node, no Cast (models/fused.py)
            return torch.ops.arexport.rms_normalize(x, self.weight, self.eps)
        xf = x.float()
        out = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Attention(nn.Module):
    """Multi-head (or grouped-query) attention with a fused qkv projection."""

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.dim = cfg.dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B,L,dim] -> q [B,H,L,D], k and v [B,Hkv,L,D] with RoPE applied to q and k."""
        b, l, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        # Split first, right after the projection: ONNX Runtime (1.32) moves an int8 engine's Q/DQ
        # across a Reshape placed there and then refuses the graph (its S8->U8 pass leaves a Q whose
        # output type disagrees with its zero point); a Split stops that move.
        q, k, v = self.wqkv(x).split([self.dim, kv, kv], dim=-1)
        q, k, v = (t.view(b, l, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask: Optional[torch.Tensor], is_causal: bool = False) -> torch.Tensor:
        """SDPA over k/v (any length) -> [B, L, dim] after the output projection."""
        b, _, l, _ = q.shape
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv_head != self.n_head
        )
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, l, self.dim)))


class TransformerBlock(nn.Module):
    """Pre-norm block: attention then SwiGLU, each with a residual."""

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward_full(self, h, cos, sin, mask, is_causal):
        """No-cache forward over the whole sequence."""
        q, k, v = self.attention.project(self.attention_norm(h), cos, sin)
        h = h + self.attention.attend(q, k, v, mask, is_causal)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_step(self, h, cos, sin, write_index, attn_mask, past_k, past_v, cache_write: CacheWrite):
        """Write this step's k/v into the static buffers, attend over the live slots under attn_mask [B,1,q,L]."""
        q, k, v = self.attention.project(self.attention_norm(h), cos, sin)
        keys = cache_write(past_k, k, write_index)
        values = cache_write(past_v, v, write_index)
        h = h + self.attention.attend(q, live_slots(keys, attn_mask), live_slots(values, attn_mask), attn_mask)
        return h + self.feed_forward(self.ffn_norm(h)), keys, values


class LabelEmbedder(nn.Module):
    """Class embedding table; row `num_classes` is the null class when dropout was used."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels).unsqueeze(1)


class CaptionMLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, out: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Projects T5 caption features [B,120,2048] to the model width; holds the null caption."""

    def __init__(self, caption_dim: int, dim: int, token_num: int):
        super().__init__()
        self.cap_proj = CaptionMLP(caption_dim, dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim**0.5)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.cap_proj(caption)


class Fp32RopeTables:
    """Mixin: `to_precision` casts weights but keeps the RoPE tables fp32 (the reference computes rotary math in fp32)."""

    def to_precision(self, device=None, dtype=None):
        self.to(device=device, dtype=dtype)
        self.rope_cos, self.rope_sin = self.rope_cos.float(), self.rope_sin.float()
        return self


def inplace_cache_write(past: torch.Tensor, new: torch.Tensor, write_index: torch.Tensor) -> torch.Tensor:
    """Write new [B,H,q,D] into past [B,H,S,D] at slots write_index[b]..+q, in place; returns past."""
    b, h, q, d = new.shape
    slots = write_index.view(b, 1, 1, 1) + torch.arange(q, device=new.device).view(1, 1, q, 1)
    past.scatter_(2, slots.expand(b, h, q, d), new.to(past.dtype))
    return past


class LlamaGen(Fp32RopeTables, nn.Module):
    """LlamaGen Transformer with a static-cache step function."""

    STEP_WEIGHTS = ("layers.", "norm.", "output.")  # parameters every step reads in full (bandwidth model)

    @property
    def step_kinds(self) -> tuple[str, ...]:
        """The step kinds (arexport.format.stepkinds) this model implements."""
        return ("token", "token_hidden", "tree_verify") + (("caption_prefill", "caption_prefill_hidden")
                                                           if self.cfg.model_type == "t2i" else ())

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.model_type == "c2i":
            self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        else:
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.cls_token_num)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_table_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base)
        # Row 0 is the condition position (zeros); row 1 + i is grid position i.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # -- initialisation -------------------------------------------------------------------
    def init_random(self, seed: int = 0, std: float = 0.02) -> "LlamaGen":
        """LlamaGen's init (normal(0, 0.02) for Linear/Embedding), but with a non-zero head so
        random-weight models give non-degenerate logits for latency and parity work."""
        g = torch.Generator().manual_seed(seed)
        normal_init_(self, g, std)
        if self.cfg.model_type == "t2i":
            with torch.no_grad():
                u = self.cls_embedding.uncond_embedding
                u.copy_(torch.randn(u.shape, generator=g) / self.cfg.caption_dim**0.5)
        return self

    # -- embeddings -------------------------------------------------------------------------
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B,q] -> [B,q,dim]. For c2i, ids >= vocab_size are class tokens (class id + V)."""
        v = self.cfg.vocab_size
        if self.cfg.model_type != "c2i":
            return self.tok_embeddings(tokens)
        img = self.tok_embeddings(torch.minimum(tokens, tokens.new_tensor(v - 1)))  # Min, not Clip: TensorRT has no integer Clip
        cls = self.cls_embedding.embedding_table(torch.maximum(tokens - v, tokens.new_zeros(())))
        return torch.where((tokens >= v).unsqueeze(-1), cls, img)

    def rope(self, positions: torch.Tensor):
        """positions [B,L] (grid index, -1 = condition) -> cos, sin [B,L,1,D/2] fp32."""
        idx = positions + 1
        cos, sin = self.rope_cos[idx].unsqueeze(2), self.rope_sin[idx].unsqueeze(2)
        if fused():  # an engine rotates in rotary_dtype: the rows are cast here, once for all layers (models/fused.py)
            dt = rotary_dtype(self.output.weight.dtype)
            cos, sin = cos.to(dt), sin.to(dt)
        return cos, sin

    def condition_embeddings(self, cond: torch.Tensor) -> torch.Tensor:
        """c2i: class ids [B] -> [B,1,dim]; t2i: caption features [B,T,C] -> [B,T,dim]."""
        return self.cls_embedding(cond)

    # -- teacher forcing ----------------------------------------------------------------------
    def forward(self, cond: torch.Tensor, tokens: torch.Tensor, cond_mask: Optional[torch.Tensor] = None):
        """Teacher forcing: logits [B, n, V] fp32 where row i predicts image token i.

        cond: class ids [B] or caption features [B,T,C]; tokens: image tokens [B, n] (n <= n_tokens,
        the last one is not fed); cond_mask: t2i padding mask [B,T] (True = valid).
        """
        ce = self.condition_embeddings(cond)
        t = ce.shape[1]
        h = self.tok_dropout(torch.cat([ce, self.tok_embeddings(tokens[:, :-1])], dim=1))
        b, l, _ = h.shape
        pos = torch.cat([torch.full((t,), -1), torch.arange(tokens.shape[1] - 1)]).to(h.device)
        cos, sin = self.rope(pos.unsqueeze(0).expand(b, l))
        mask, is_causal = None, True
        if cond_mask is not None:
            mask = self.full_sequence_mask(cond_mask, l)
            is_causal = False
        for layer in self.layers:
            h = layer.forward_full(h, cos, sin, mask, is_causal)
        logits = self.output(self.norm(h)).float()
        return logits[:, t - 1 :]

    @staticmethod
    def full_sequence_mask(cond_mask: torch.Tensor, length: int) -> torch.Tensor:
        """Causal mask that hides padded condition keys (every token still sees itself): [B,1,L,L]."""
        b, t = cond_mask.shape
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=cond_mask.device))
        valid = torch.cat([cond_mask.bool(), torch.ones(b, length - t, dtype=torch.bool, device=cond_mask.device)], 1)
        eye = torch.eye(length, dtype=torch.bool, device=cond_mask.device)
        return (causal & (valid[:, None, :] | eye)).unsqueeze(1)

    # -- step function -----------------------------------------------------------------------
    def step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        write_index: torch.Tensor,
        attn_mask: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        cache_write: CacheWrite = inplace_cache_write,
    ):
        """One step over q new tokens: logits [B,q,V] fp32 and the (updated) cache buffers.

        tokens [B,q] int64; positions [B,q] int64 grid indices (-1 = condition, zero RoPE);
        write_index [B] int64 first cache slot; attn_mask [B,1,q,S_max] bool (True = attend);
        keys/values: per-layer [B,H_kv,S_max,D] buffers.
        """
        return self._run_layers(self.embed_tokens(tokens), positions, write_index, attn_mask, keys, values, cache_write, last_only=False)

    def step_hidden(self, tokens, positions, write_index, attn_mask, keys, values, cache_write: CacheWrite = inplace_cache_write):
        """`step` that also returns the last layer's hidden state of the positions fed, after the final
        norm (the output head's input, what EAGLE-style draft heads read): (logits [B,q,V] fp32, hidden
        [B,q,dim] in the model's precision, keys, values)."""
        h, keys, values = self._hidden(self.embed_tokens(tokens), positions, write_index, attn_mask, keys, values, cache_write)
        h = self.norm(h)
        return self.output(h).float(), h, keys, values

    def prefill_embeds(self, cond: torch.Tensor, attn_mask, keys, values, cache_write: CacheWrite = inplace_cache_write):
        """Condition prefill at slots [0, T): logits of the last condition position [B,V] and caches."""
        h = self.condition_embeddings(cond)
        b, t, _ = h.shape
        positions = torch.full((b, t), -1, dtype=torch.long, device=h.device)
        write_index = torch.zeros(b, dtype=torch.long, device=h.device)
        logits, keys, values = self._run_layers(h, positions, write_index, attn_mask, keys, values, cache_write, last_only=True)
        return logits, keys, values

    def prefill_embeds_hidden(self, cond: torch.Tensor, attn_mask, keys, values, cache_write: CacheWrite = inplace_cache_write):
        """`prefill_embeds` that also returns every condition position's hidden state after the final norm:
        (logits [B,V] fp32 of the last position, hidden [B,T,dim] in the model's precision, keys, values)."""
        h = self.condition_embeddings(cond)
        b, t, _ = h.shape
        positions = torch.full((b, t), -1, dtype=torch.long, device=h.device)
        write_index = torch.zeros(b, dtype=torch.long, device=h.device)
        h, keys, values = self._hidden(h, positions, write_index, attn_mask, keys, values, cache_write)
        h = self.norm(h)
        return self.output(h[:, -1]).float(), h, keys, values

    def _run_layers(self, h, positions, write_index, attn_mask, keys, values, cache_write, last_only):
        h, new_keys, new_values = self._hidden(h, positions, write_index, attn_mask, keys, values, cache_write)
        if last_only:
            h = h[:, -1]
        return self.output(self.norm(h)).float(), new_keys, new_values

    def _hidden(self, h, positions, write_index, attn_mask, keys, values, cache_write):
        """The layer stack over inputs h [B,q,dim]: the last layer's output and the cache buffers."""
        cos, sin = self.rope(positions)
        new_keys, new_values = [], []
        for layer, pk, pv in zip(self.layers, keys, values):
            h, k, v = layer.forward_step(h, cos, sin, write_index, attn_mask, pk, pv, cache_write)
            new_keys.append(k)
            new_values.append(v)
        return h, new_keys, new_values


# -- catalog: LlamaGen's released models ---------------------------------------------------------
# (n_layer, n_head, dim) from LlamaGen's GPT configs.
LLAMAGEN_SIZES = {
    "B": (12, 12, 768),
    "L": (24, 16, 1024),
    "XL": (36, 20, 1280),
    "XXL": (48, 24, 1536),
    "XXXL": (48, 40, 2560),
    "1B": (22, 32, 2048),
    "3B": (24, 32, 3200),
    "7B": (32, 32, 4096),
}


class LlamaGenCatalog(Catalog):
    """`llamagen-{c2i,t2i}-<size>` (every published size; aliases GPT-B, c2i-B, t2i-XL)."""

    family = "llamagen"
    config_class = LlamaGenConfig
    checkpoint_marker = "tok_embeddings.weight"
    hint = "llamagen-c2i-<size>"
    alias_help = (f"GPT-SIZE and c2i-SIZE for llamagen-c2i-SIZE, t2i-SIZE for llamagen-t2i-SIZE "
                  f"(SIZE: {', '.join(LLAMAGEN_SIZES)})")
    ALIASES = (("gpt-", "c2i"), ("llamagen-c2i-", "c2i"), ("llamagen-t2i-", "t2i"), ("c2i-", "c2i"), ("t2i-", "t2i"))

    def names(self):
        return [f"llamagen-{t}-{s}" for t in ("c2i", "t2i") for s in LLAMAGEN_SIZES]

    def canonical(self, name):
        low = name.lower()
        for prefix, mtype in self.ALIASES:
            if low.startswith(prefix) and name[len(prefix):].upper() in LLAMAGEN_SIZES:
                return f"llamagen-{mtype}-{name[len(prefix):].upper()}"
        return None

    def base_config(self, name, image_size):
        _, mtype, size = name.split("-")
        n_layer, n_head, dim = LLAMAGEN_SIZES[size]
        kw: dict = dict(n_layer=n_layer, n_head=n_head, dim=dim, model_type=mtype)
        if mtype == "t2i":
            kw["cls_token_num"] = 120
        if image_size is not None:
            kw["grid_size"] = image_size // 16
        return LlamaGenConfig(**kw)


CATALOG = LlamaGenCatalog()
