"""EAGLE draft head: a decoder layer fed fc([token embedding; target hidden state]) with its own cache.

The layout follows the drafters LANTERN trains and releases (jadohu/LANTERN
`models/drafters/cnets_llamagen.py`, class `Model`, commit 3a56e45, lines 428-495 and 509-727):

* `embed_tokens` [V, dim] (a copy of the target's token table), `fc` Linear(2 dim -> dim, bias by
  default; config key `bias`) applied to cat(embedding(x_{t+1}), h_t), where h_t is the target's last
  hidden state after its final norm (the output head's input);
* `num_hidden_layers` Llama decoder layers named `layers.i.self_attn.{q,k,v,o}_proj`,
  `layers.i.mlp.{gate,up,down}_proj`, `layers.i.post_attention_layernorm`; layer 0 has no input
  norm (its input is the fc output), later layers have `input_layernorm`;
* no final norm: the head's output hidden state goes straight into the target's output projection
  (`lm_head.weight` [V, dim]; the released drafters do not carry it, the target's is used).

The pair (h_t, x_{t+1}) sits at grid position t (RoPE as the target's 2D table, interleaved pairs); position -1
is a condition position, whose q and k the all-zero rotary row zeroes (the official t2i table's first
`cls_token_num` rows, lines 47-63 and 561-573).
A call writes its q new K/V at slots write_index[b] .. + q of a static cache [B, H_kv, S, D] per layer
and attends under attn_mask [B, 1, q, S] (True = attend), so a whole draft-tree level is one call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from arexport.errors import ArexportError, CheckpointError
from arexport.models.fused import fused, live_slots
from arexport.models.llamagen import RMSNorm  # the same fp32 norm; traced as one RMSNormalization node
from arexport.models.rope import apply_rope, rope_table_2d

# official `input_type` -> the grid its rope table covers (cnets_llamagen.py lines 561-573 at 3a56e45)
OFFICIAL_GRIDS = {"c2i": 24, "t2i": 16, "t2i2": 32}
MAX_HEAD_VOCAB = 1 << 20
MAX_HEAD_WIDTH = 1 << 14


@dataclass(frozen=True)
class EagleConfig:
    """Sizes of a draft head; `dim` must equal the target's width and `vocab_size` its vocabulary."""

    dim: int
    n_head: int
    n_kv_head: int
    ffn_hidden: int
    vocab_size: int
    grid_size: int
    n_layer: int = 1
    norm_eps: float = 1e-6
    bias: bool = True
    rope_base: float = 10000.0

    def __post_init__(self):
        for k in ("dim", "n_head", "n_kv_head", "ffn_hidden", "vocab_size", "grid_size", "n_layer"):
            if int(getattr(self, k)) < 1:
                raise ArexportError(f"draft head config: {k} must be >= 1, got {getattr(self, k)}")
        if self.dim > MAX_HEAD_WIDTH or self.vocab_size > MAX_HEAD_VOCAB or self.ffn_hidden > 8 * MAX_HEAD_WIDTH:
            raise ArexportError(f"draft head config is too large (dim {self.dim}, vocab {self.vocab_size}, "
                                f"ffn {self.ffn_hidden}); limits {MAX_HEAD_WIDTH}, {MAX_HEAD_VOCAB}, {8 * MAX_HEAD_WIDTH}")
        if self.dim % self.n_head or self.n_head % self.n_kv_head or (self.dim // self.n_head) % 4:
            raise ArexportError(f"draft head config: dim {self.dim} / {self.n_head} heads / {self.n_kv_head} kv heads "
                                "do not split into whole heads with a head size divisible by 4")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @classmethod
    def from_official(cls, cfg: dict, grid_size: Optional[int] = None) -> "EagleConfig":
        """From a released drafter's config.json (Hugging Face Llama keys; `input_type` names the grid)."""
        try:
            grid = grid_size or cfg.get("grid_size") or OFFICIAL_GRIDS[cfg.get("input_type", "")]
            return cls(dim=int(cfg["hidden_size"]), n_head=int(cfg["num_attention_heads"]),
                       n_kv_head=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
                       ffn_hidden=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]), grid_size=int(grid),
                       n_layer=int(cfg.get("num_hidden_layers", 1)), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                       bias=bool(cfg.get("bias", True)), rope_base=float(cfg.get("rope_theta", 10000.0)))
        except KeyError as e:
            raise CheckpointError(f"draft head config.json lacks {e.args[0]!r} (and no grid_size/input_type names its grid)"
                                  if e.args[0] != cfg.get("input_type", "") else
                                  f"draft head config.json: unknown input_type {e.args[0]!r} and no grid_size") from None

    def to_official(self) -> dict:
        """The config.json a released drafter carries (plus grid_size)."""
        return {"hidden_size": self.dim, "num_attention_heads": self.n_head, "num_key_value_heads": self.n_kv_head,
                "intermediate_size": self.ffn_hidden, "vocab_size": self.vocab_size, "num_hidden_layers": self.n_layer,
                "rms_norm_eps": self.norm_eps, "bias": self.bias, "rope_theta": self.rope_base, "hidden_act": "silu",
                "grid_size": self.grid_size}


class _Attention(nn.Module):
    def __init__(self, c: EagleConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.dim, c.n_head * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.n_kv_head * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.n_kv_head * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.dim, c.dim, bias=False)

    def project(self, x):
        """q, k, v [B, q, width] (the official separate projections; tracing a head engine, one MatMul and a Split:
        ONNX Runtime folds the weights' Concat once, the node count of a small head's call is its cost)."""
        if not fused():
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        return F.linear(x, w).split([self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], dim=-1)


class _MLP(nn.Module):
    def __init__(self, c: EagleConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(c.dim, c.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(c.ffn_hidden, c.dim, bias=False)

    def forward(self, x):
        if fused():  # tracing a head engine: gate and up as one MatMul (ONNX Runtime folds the weights' Concat once)
            gate, up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight])).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, c: EagleConfig, index: int):
        super().__init__()
        self.self_attn = _Attention(c)
        self.mlp = _MLP(c)
        if index:
            self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)


class EagleHead(nn.Module):
    """The draft head (see the module docstring); `step` is its static-cache step function."""

    def __init__(self, cfg: EagleConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.fc = nn.Linear(2 * cfg.dim, cfg.dim, bias=cfg.bias)
        self.layers = nn.ModuleList([_Layer(cfg, i) for i in range(cfg.n_layer)])
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_table_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The precision of its hidden states."""
        return self.fc.weight.dtype

    def cache_shape(self, batch: int, slots: int) -> tuple[int, int, int, int]:
        return (batch, self.cfg.n_kv_head, slots, self.cfg.head_dim)

    def allocate(self, batch: int, slots: int):
        """Zeroed per-layer K and V buffers [batch, H_kv, slots, D]."""
        p = self.fc.weight
        return ([torch.zeros(self.cache_shape(batch, slots), dtype=p.dtype, device=p.device) for _ in self.layers],
                [torch.zeros(self.cache_shape(batch, slots), dtype=p.dtype, device=p.device) for _ in self.layers])

    @property
    def step_kinds(self) -> tuple[str, ...]:
        """The step kinds (arexport.format.stepkinds) this model implements."""
        return ("draft_head",)

    def spec(self, slots: int):
        """A ModelSpec for exporting the head's step (its sizes; slots = its cache length)."""
        from arexport.format.spec import ImageSpec, ModelSpec

        c = self.cfg
        return ModelSpec(name="eagle-head", family="eagle", model_type="c2i", vocab_size=c.vocab_size,
                         n_tokens=c.grid_size**2, grid_size=c.grid_size, cond_len=0, num_classes=0, caption_dim=0,
                         n_layer=c.n_layer, n_head=c.n_head, n_kv_head=c.n_kv_head, head_dim=c.head_dim, dim=c.dim,
                         n_cache_layers=c.n_layer, s_max=slots, image=ImageSpec("digits", c.grid_size, c.grid_size, 1))

    def step(self, hidden, tokens, positions, write_index, attn_mask, keys, values, cache_write=None):
        """hidden [B,q,dim] (target hidden states h_t, or the head's own outputs deeper in a tree), tokens
        [B,q] (x_{t+1}), positions [B,q] grid index t, write_index [B], attn_mask [B,1,q,S] bool ->
        (logits [B,q,V] fp32, out_hidden [B,q,dim], keys, values); `cache_write(past, new, write_index)`
        writes K/V (default: in place; the exporter passes its functional scatter)."""
        if cache_write is None:
            from arexport.models.llamagen import inplace_cache_write as cache_write
        c = self.cfg
        b, q, _ = hidden.shape
        # -1: a condition position (rope row 0: zero rotary); Max/Min, not Clip: TensorRT parses Clip in float only (and
        # the exporter folds Max/Min against constant bounds into a Clip)
        idx = torch.minimum(torch.maximum(positions + 1, torch.zeros_like(positions)),
                            torch.full_like(positions, c.grid_size**2))
        cos, sin = F.embedding(idx, self.rope_cos).unsqueeze(2), F.embedding(idx, self.rope_sin).unsqueeze(2)
        h = self.fc(torch.cat([self.embed_tokens(tokens).to(hidden.dtype), hidden], dim=-1))
        keys, values = list(keys), list(values)
        for i, layer in enumerate(self.layers):
            residual = h
            x = layer.input_layernorm(h) if i else h
            a = layer.self_attn
            qh, kh, vh = a.project(x)
            qh = qh.view(b, q, c.n_head, c.head_dim).transpose(1, 2)
            kh = kh.view(b, q, c.n_kv_head, c.head_dim).transpose(1, 2)
            vh = vh.view(b, q, c.n_kv_head, c.head_dim).transpose(1, 2)
            qh, kh = apply_rope(qh, cos, sin), apply_rope(kh, cos, sin)
            keys[i] = cache_write(keys[i], kh, write_index)
            values[i] = cache_write(values[i], vh, write_index)
            out = F.scaled_dot_product_attention(qh, live_slots(keys[i], attn_mask), live_slots(values[i], attn_mask), attn_mask=attn_mask,
                                                 enable_gqa=c.n_kv_head != c.n_head)
            h = residual + a.o_proj(out.transpose(1, 2).reshape(b, q, c.dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(h).float(), h, keys, values

    def init_random(self, seed: int = 0, std: float = 0.02) -> "EagleHead":
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "norm" in name:
                    continue
                p.copy_(torch.randn(p.shape, generator=g) * (0 if name.endswith("bias") else std))
        return self


# -- loading ---------------------------------------------------------------------------------------------
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PACKAGED_HEADS = {"demo-eagle": "demo-eagle.safetensors"}
CHECKPOINT_NAMES = ("model.safetensors", "pytorch_model.bin")


def resolve_head_path(spec: str) -> Path:
    """A packaged head name (demo-eagle), a drafter directory, or a .safetensors/.bin file."""
    if spec in PACKAGED_HEADS:
        return WEIGHTS_DIR / PACKAGED_HEADS[spec]
    p = Path(spec)
    if not p.exists():
        raise ArexportError(f"--draft-head {spec}: no such file or directory (packaged heads: {', '.join(PACKAGED_HEADS)})")
    return p


def load_eagle_head(spec: str, target_dim: Optional[int] = None, target_vocab: Optional[int] = None,
                    lm_head: Optional[torch.Tensor] = None, grid_size: Optional[int] = None) -> EagleHead:
    """Load a draft head: a directory in the released layout (config.json plus model.safetensors or
    pytorch_model.bin with the official parameter names), or one .safetensors file whose metadata holds
    the config (what scripts/train_demo.py writes). `lm_head` [V, dim] is the target's output projection
    when the file has none. Raises ArexportError naming a width or vocabulary that differs from the
    target's, a missing or unexpected parameter, or a missing file."""
    from arexport.models.checkpoint import read_state_dict

    p = resolve_head_path(spec)
    if p.is_dir():
        cfg_path = p / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(f"draft head directory {p} has no config.json")
        files = [p / n for n in CHECKPOINT_NAMES if (p / n).exists()]
        if not files:
            raise CheckpointError(f"draft head directory {p} has neither {' nor '.join(CHECKPOINT_NAMES)}")
        try:
            raw_cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"draft head config {cfg_path} is not JSON ({e})") from None
        cfg = EagleConfig.from_official(raw_cfg, grid_size)
        weights = files[0]
    else:
        if p.suffix != ".safetensors":
            raise CheckpointError(f"draft head file {p}: expected a .safetensors file with its config, or a directory")
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error types on bad bytes
            raise CheckpointError(f"draft head {p} is not a readable safetensors file ({e})") from None
        if "config" not in meta:
            raise CheckpointError(f"draft head file {p} carries no config in its metadata; pass its directory instead")
        cfg = EagleConfig.from_official(json.loads(meta["config"]), grid_size)
        weights = p
    if target_dim is not None and cfg.dim != target_dim:
        raise ArexportError(f"draft head {spec} has width {cfg.dim}; the target's hidden state has width {target_dim}")
    if target_vocab is not None and cfg.vocab_size != target_vocab:
        raise ArexportError(f"draft head {spec} has a vocabulary of {cfg.vocab_size}; the target's is {target_vocab}")
    sd = read_state_dict(weights)
    head = EagleHead(cfg)
    want = set(head.state_dict())
    if "lm_head.weight" not in sd:
        if lm_head is None:
            raise CheckpointError(f"draft head {spec} has no lm_head.weight and no target output projection was given")
        sd["lm_head.weight"] = lm_head
    missing, unexpected = sorted(want - set(sd)), sorted(set(sd) - want)
    if missing or unexpected:
        raise CheckpointError(f"draft head {spec}: " + (f"missing {', '.join(missing[:6])}" if missing else "")
                              + ("; " if missing and unexpected else "") + (f"unexpected {', '.join(unexpected[:6])}" if unexpected else ""))
    for k, v in sd.items():
        if tuple(v.shape) != tuple(head.state_dict()[k].shape):
            raise CheckpointError(f"draft head {spec}: {k} has shape {list(v.shape)}, the config says "
                                  f"{list(head.state_dict()[k].shape)}")
    head.load_state_dict({k: v.float() for k, v in sd.items()})
    return head.eval()


def save_eagle_head(head: EagleHead, path: Path, with_lm_head: bool = True) -> None:
    """One .safetensors file with the config in its metadata (the packaged demo head's layout)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().clone() for k, v in head.state_dict().items() if with_lm_head or k != "lm_head.weight"}
    save_file(sd, str(path), metadata={"config": json.dumps(head.cfg.to_official())})

