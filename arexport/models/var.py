"""VAR (FoundationVision/VAR): next-scale prediction with a multi-scale residual VQVAE, with a
static-cache scale-block step function.

Facts kept from the reference (`models/var.py`, `basic_var.py`, `quant.py`, `basic_vae.py`):

* Width 64 * depth and depth heads for the released d16..d36; class embedding with row
  `num_classes` as the null class; the first scale's input is `class_emb(c) + pos_start`, later
  scales' inputs are `word_embed` of the VQVAE's interpolated `f_hat` (Cvae features); every
  position adds `lvl_embed(level) + pos_1LC[position]`.
* Blocks are AdaLN self-attention: affine-free LayerNorm (eps 1e-6) modulated by
  `ada_lin(cond)` (or, `shared_aln`, the shared `ada_gss + shared_ada_lin(cond)`) into
  gamma1, gamma2, scale1, scale2, shift1, shift2; attention has a bias-free `mat_qkv` with
  `q_bias`, a zero k bias and `v_bias`; with `attn_l2_norm` (the released models) q and k are
  l2-normalised, q scaled by exp(min(scale_mul, log 100)) and the softmax scale is 1, else
  0.25 / sqrt(head_dim); the FFN is fc2(GELU-tanh(fc1 x)). The head is `AdaLNBeforeHead` then
  `head`, in fp32.
* Inference (`autoregressive_infer_cfg`): scale k's logits are guided (1 + t) c - t u with
  t = cfg * k / (n_scales - 1); tokens -> codebook rows -> `get_next_autoregressive_input`
  (bicubic up to the last scale, phi conv, add to f_hat, area down to the next scale).

Step function (`step`, traced by the exporter): one scale block of q positions. Inputs are the
Cvae features of those positions (ignored at position 0, which takes the class embedding), their
sequence positions, the class ids, the write slot and a block-causal mask. The condition vector
is recomputed from the class ids each call (it is one embedding row). Slots equal positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from arexport.format.scales import Scales
from arexport.format.spec import ImageSpec, ModelSpec, s_max_for
from arexport.errors import ArexportError
from arexport.models.catalog import Catalog
from arexport.models.fused import live_slots
from arexport.models.llamagen import CacheWrite, inplace_cache_write

VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # 680 tokens
VAR_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # 2240 tokens (var_d36)


@dataclass(frozen=True)
class VARConfig:
    """VAR transformer + VQVAE hyper-parameters (build_vae_var's arguments)."""

    depth: int
    dim: int = 0  # embed_dim; 0 = 64 * depth (the released models)
    n_head: int = 0  # 0 = depth
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    num_classes: int = 1000
    vocab_size: int = 4096
    cvae: int = 32
    patch_nums: tuple = VAR_256
    # the multi-scale VQVAE (vae_ch160v4096z32: ch 160, ch_mult 1,1,2,2,4, 2 res blocks, 4 shared phi)
    vae_ch: int = 160
    vae_ch_mult: tuple = (1, 1, 2, 2, 4)
    vae_num_res_blocks: int = 2
    vae_share_quant_resi: int = 4
    vae_quant_resi: float = 0.5
    image_upscale: int = 1  # nearest upscale of decoded pixels (the digits demo: 8 px -> 128 px)
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        object.__setattr__(self, "vae_ch_mult", tuple(int(p) for p in self.vae_ch_mult))
        if self.dim == 0:
            object.__setattr__(self, "dim", 64 * self.depth)
        if self.n_head == 0:
            object.__setattr__(self, "n_head", self.depth)
        for f in ("depth", "dim", "n_head", "vocab_size", "num_classes", "cvae", "vae_ch"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} is not divisible by n_head={self.n_head}")
        if self.vae_ch % 32:
            raise ValueError(f"vae_ch={self.vae_ch} must be a multiple of 32 (GroupNorm with 32 groups)")
        Scales(self.patch_nums)

    # the names the shared code reads
    @property
    def n_layer(self) -> int:
        return self.depth

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def scales(self) -> Scales:
        return Scales(self.patch_nums)

    @property
    def n_tokens(self) -> int:
        return self.scales.total

    @property
    def grid_size(self) -> int:
        return self.patch_nums[-1]

    def with_overrides(self, **kw) -> "VARConfig":
        return replace(self, **kw)

    def build(self) -> "VAR":
        return VAR(self)

    def spec(self, name: str, image_size: int | None = None) -> ModelSpec:
        pixels = self.grid_size * 2 ** (len(self.vae_ch_mult) - 1) * self.image_upscale
        return ModelSpec(
            name=name, family="var", model_type="c2i", vocab_size=self.vocab_size, n_tokens=self.n_tokens,
            grid_size=self.grid_size, cond_len=0, num_classes=self.num_classes, caption_dim=0,
            n_layer=self.depth, n_head=self.n_head, n_kv_head=self.n_head, head_dim=self.head_dim, dim=self.dim,
            n_cache_layers=self.depth, s_max=s_max_for(0, self.n_tokens),
            image=ImageSpec("var", self.grid_size, pixels, self.cvae),
            extra={**self.extra, "patch_nums": list(self.patch_nums), "cvae": self.cvae},
        )


# -- the transformer ------------------------------------------------------------------------------
class SharedAdaLin(nn.Linear):
    """shared_aln: one linear for every block, output viewed [B, 1, 6, C]."""

    def forward(self, cond):
        return super().forward(cond).view(-1, 1, 6, self.weight.shape[0] // 6)


class SelfAttention(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        c, h = cfg.dim, cfg.n_head
        self.n_head, self.head_dim, self.l2 = h, c // h, cfg.attn_l2_norm
        self.mat_qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("zero_k_bias", torch.zeros(c))
        if self.l2:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, h, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        self.scale = 1.0 if self.l2 else 0.25 / math.sqrt(self.head_dim)
        self.proj = nn.Linear(c, c)

    def qkv(self, x):
        """x [B,L,C] -> q, k, v [B,H,L,D] (q and k l2-normalised and q scaled, with attn_l2_norm)."""
        b, n, _ = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(b, n, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.l2:  # in fp32: ReduceL2 and Clip have no bf16 kernels in ONNX Runtime (CPU or CUDA)
            scale = self.scale_mul_1H11.float().clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q.float(), dim=-1).mul(scale).to(q.dtype)
            k = F.normalize(k.float(), dim=-1).to(k.dtype)
        return q, k, v

    def out(self, o):
        b, _, n, _ = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, n, -1))


class FFN(nn.Module):
    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        c = cfg.dim
        self.C, self.shared = c, cfg.shared_aln
        self.attn = SelfAttention(cfg)
        self.ffn = FFN(c, round(c * cfg.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(c, eps=cfg.norm_eps, elementwise_affine=False)
        if self.shared:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, c) / c ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))

    def forward(self, x, cond, attend):
        """cond: the shared modulation [B,1,6,C] (shared_aln) or the class vector [B,C]; attend(q, k, v)."""
        if self.shared:
            g1, g2, s1, s2, b1, b2 = (self.ada_gss + cond).unbind(2)
        else:
            g1, g2, s1, s2, b1, b2 = self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)
        x = x + self.attn.out(attend(*self.attn.qkv(self.ln_wo_grad(x).mul(s1.add(1)).add(b1)))).mul(g1)
        return x + self.ffn(self.ln_wo_grad(x).mul(s2.add(1)).add(b2)).mul(g2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, c: int, eps: float):
        super().__init__()
        self.C = c
        self.ln_wo_grad = nn.LayerNorm(c, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))

    def forward(self, x, cond):
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add(shift)


class VAR(nn.Module):
    """The VAR transformer (parameter names as in var_d*.pth) with a scale-block step function."""

    STEP_WEIGHTS = ("blocks.", "head", "word_embed.", "shared_ada_lin.")  # read in full every step (bandwidth model)
    step_kinds = ("scale",)  # the step kinds (arexport.format.stepkinds) this model implements

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        sc = cfg.scales
        c, L = cfg.dim, sc.total
        self.first_l = cfg.patch_nums[0] ** 2
        self.word_embed = nn.Linear(cfg.cvae, c)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, c)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, c))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, c))
        self.lvl_embed = nn.Embedding(len(sc), c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(c, 6 * c)) if cfg.shared_aln else nn.Identity()
        self.blocks = nn.ModuleList([AdaLNSelfAttn(cfg) for _ in range(cfg.depth)])
        # the reference keeps its training mask and level table as (saved) buffers
        d = sc.level.view(1, L, 1)
        self.register_buffer("lvl_1L", d.transpose(1, 2)[:, 0].contiguous())
        self.register_buffer("attn_bias_for_masking",
                             torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, L, L).contiguous())
        self.head_nm = AdaLNBeforeHead(c, cfg.norm_eps)
        self.head = nn.Linear(c, cfg.vocab_size)

    def to_precision(self, device=None, dtype=None):
        return self.to(device=device, dtype=dtype)

    def init_random(self, seed: int = 0, std: float = 0.02) -> "VAR":
        """Every parameter ~ N(0, std) (LayerNorms have no weights; the buffers stay). Unlike the
        reference init the AdaLN and head layers are random too, so random models exercise every term."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("scale_mul_1H11"):
                    p.copy_(torch.full_like(p, math.log(4.0)) + torch.randn(p.shape, generator=g) * 0.1)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def inputs(self, features, positions, cond):
        """Input vectors [B,q,C]: position 0.. first_l-1 take class_emb + pos_start, the others
        word_embed(features); every position adds lvl_embed(level) + pos_1LC[position]."""
        dtype = self.word_embed.weight.dtype
        sos = cond.unsqueeze(1) + self.pos_start[0, torch.minimum(positions, positions.new_tensor(self.first_l - 1))]
        x = torch.where((positions < self.first_l).unsqueeze(-1), sos, self.word_embed(features.to(dtype)))
        lvl_pos = self.lvl_embed(self.lvl_1L[0, positions]) + self.pos_1LC[0, positions]
        return x + lvl_pos

    def head_logits(self, h, cond):
        return self.head(self.head_nm(h, cond)).float()

    def step(self, features, positions, classes, write_index, attn_mask, keys, values,
             cache_write: CacheWrite = inplace_cache_write):
        """One scale block: logits [B,q,V] fp32 and the (updated) cache buffers.

        features [B,q,Cvae] float (next-scale inputs; ignored at the first scale's positions);
        positions [B,q] int64 sequence index; classes [B] int64 (num_classes = the null class);
        write_index [B] first cache slot; attn_mask [B,1,q,S] bool; keys/values: depth buffers [B,H,S,D].
        """
        cond = self.class_emb(classes)
        h = self.inputs(features, positions, cond)
        mod = self.shared_ada_lin(cond)
        new_keys, new_values = [], []
        for blk, pk, pv in zip(self.blocks, keys, values):
            def attend(qh, kh, vh, pk=pk, pv=pv, blk=blk):
                k_all = cache_write(pk, kh, write_index)
                v_all = cache_write(pv, vh, write_index)
                new_keys.append(k_all)
                new_values.append(v_all)
                return F.scaled_dot_product_attention(qh, live_slots(k_all, attn_mask).to(qh.dtype),
                                                      live_slots(v_all, attn_mask).to(qh.dtype), attn_mask=attn_mask,
                                                      scale=blk.attn.scale)
            h = blk(h, mod, attend)
        return self.head_logits(h, cond), new_keys, new_values

    def forward(self, classes: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: classes [B], features [B, L - first_l, Cvae] (the VQVAE's next-scale
        inputs of scales 1..) -> logits [B, L, V] fp32 under the block-causal mask."""
        b, L = classes.shape[0], self.cfg.n_tokens
        feats = torch.cat([features.new_zeros(b, self.first_l, features.shape[-1]), features], 1)
        positions = torch.arange(L, device=classes.device).expand(b, L)
        mask = self.cfg.scales.visible_mask(positions, L)
        shape = (b, self.cfg.n_head, L, self.cfg.head_dim)
        dtype = self.word_embed.weight.dtype
        keys = [torch.zeros(shape, dtype=dtype, device=classes.device) for _ in self.blocks]
        values = [torch.zeros(shape, dtype=dtype, device=classes.device) for _ in self.blocks]
        zero = torch.zeros(b, dtype=torch.int64, device=classes.device)
        return self.step(feats, positions, classes, zero, mask, keys, values, cache_write=_functional_write)[0]


def _functional_write(past, new, write_index):
    """Out-of-place cache write (teacher forcing keeps autograd)."""
    b, h, q, d = new.shape
    slots = write_index.view(b, 1, 1, 1) + torch.arange(q, device=new.device).view(1, 1, q, 1)
    return past.scatter(2, slots.expand(b, h, q, d), new.to(past.dtype))


# -- the multi-scale residual VQVAE ---------------------------------------------------------------
def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _gn(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _gn(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.C = c
        self.norm = _gn(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, _, hh, ww = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.C, hh * ww).unbind(1)
        w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * self.C ** -0.5, dim=2)  # [B, HW(q), HW(k)]
        return x + self.proj_out(torch.bmm(v, w.transpose(1, 2)).view(b, self.C, hh, ww))


class _Resample(nn.Module):
    def __init__(self, c: int, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, 2 if down else 1, 0 if down else 1)

    def forward(self, x):
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _run_levels(levels, h, resample: str):
    """Each level's residual blocks (each followed by its attention block, where the level has them),
    then the level's down- or upsampling when it has one."""
    for lvl in levels:
        for i, blk in enumerate(lvl.block):
            h = blk(h)
            if len(lvl.attn):
                h = lvl.attn[i](h)
        if hasattr(lvl, resample):
            h = getattr(lvl, resample)(h)
    return h


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple, num_res_blocks: int, z: int, cin: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, ch, 3, 1, 1)
        mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        c = ch
        for i, m in enumerate(ch_mult):
            lvl = nn.Module()
            lvl.block = nn.ModuleList()
            lvl.attn = nn.ModuleList()
            c, out = ch * mult[i], ch * m
            for _ in range(num_res_blocks):
                lvl.block.append(ResnetBlock(c, out))
                c = out
                if i == len(ch_mult) - 1:
                    lvl.attn.append(AttnBlock(c))
            if i != len(ch_mult) - 1:
                lvl.downsample = _Resample(c, down=True)
            self.down.append(lvl)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
        self.norm_out, self.conv_out = _gn(c), nn.Conv2d(c, z, 3, 1, 1)

    def forward(self, x):
        h = _run_levels(self.down, self.conv_in(x), "downsample")
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple, num_res_blocks: int, z: int, cout: int = 3):
        super().__init__()
        n = len(ch_mult)
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z, c, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
        ups = []
        for i in reversed(range(n)):
            lvl = nn.Module()
            lvl.block = nn.ModuleList()
            lvl.attn = nn.ModuleList()
            out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                lvl.block.append(ResnetBlock(c, out))
                c = out
                if i == n - 1:
                    lvl.attn.append(AttnBlock(c))
            if i != 0:
                lvl.upsample = _Resample(c, down=False)
            ups.insert(0, lvl)
        self.up = nn.ModuleList(ups)
        self.norm_out, self.conv_out = _gn(c), nn.Conv2d(c, cout, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        return self.conv_out(F.silu(self.norm_out(_run_levels(reversed(self.up), h, "upsample"))))


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h)."""

    def __init__(self, c: int, ratio: float):
        super().__init__(c, c, 3, 1, 1)
        self.ratio = abs(ratio)

    def forward(self, h):
        return h.mul(1 - self.ratio) + super().forward(h).mul(self.ratio)


class _QuantResi(nn.Module):
    """`share_quant_resi` phi convs shared over the scales: scale k uses the one whose tick
    (linspace(1/3K, 1 - 1/3K, K) for K = 4, else linspace(1/2K, 1 - 1/2K, K)) is nearest k / (S - 1)."""

    def __init__(self, c: int, ratio: float, k: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(c, ratio) for _ in range(k)])
        self.ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)

    def at(self, si: int, n_scales: int) -> Phi:
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - si / max(n_scales - 1, 1))))]


class _Quantize(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.cvae)
        self.quant_resi = _QuantResi(cfg.cvae, cfg.vae_quant_resi, cfg.vae_share_quant_resi)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))


class VARVQVAE(nn.Module):
    """The multi-scale residual VQVAE (parameter names as in vae_ch160v4096z32.pth).

    `forward(tokens [N, L])` -> uint8 RGB images [N, H, W, 3], as the reference's demo writes
    them: fhat_to_img(f_hat) clamped to [-1, 1], (x + 1) / 2, times 255, truncated."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_nums = cfg.patch_nums
        self.encoder = Encoder(cfg.vae_ch, cfg.vae_ch_mult, cfg.vae_num_res_blocks, cfg.cvae)
        self.decoder = Decoder(cfg.vae_ch, cfg.vae_ch_mult, cfg.vae_num_res_blocks, cfg.cvae)
        self.quantize = _Quantize(cfg)
        self.quant_conv = nn.Conv2d(cfg.cvae, cfg.cvae, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(cfg.cvae, cfg.cvae, 3, 1, 1)

    def init_random(self, seed: int = 0, std: float = 0.02) -> "VARVQVAE":
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if ".norm" in name or name.startswith("norm"):
                    p.copy_((1.0 if name.endswith("weight") else 0.0) + torch.randn(p.shape, generator=g) * std)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * (std if p.dim() < 2 else 1.0 / math.sqrt(p[0].numel())))
        return self

    def codebook(self) -> torch.Tensor:
        """[V, Cvae] codebook rows (the embedding the next-scale inputs are built from)."""
        return self.quantize.embedding.weight

    def phi(self, si: int) -> Phi:
        return self.quantize.quant_resi.at(si, len(self.patch_nums))

    def next_scale(self, si: int, f_hat: torch.Tensor, h: torch.Tensor):
        """get_next_autoregressive_input: h [B, pn*pn, Cvae] of scale si (codebook rows, or their
        soft mix) -> (f_hat [B,Cvae,H,W], the next scale's inputs [B, pn'*pn', Cvae], None after the last).
        A half-precision VQVAE (a half engine's next-scale graphs) upsamples and convolves h in its
        dtype while f_hat keeps its own (fp32): what the reference demo does under fp16 autocast
        (FoundationVision/VAR 78b9539, demo_sample.ipynb: conv2d runs in fp16, f_hat stays fp32)."""
        b, pn, hw, n = h.shape[0], self.patch_nums[si], self.patch_nums[-1], len(self.patch_nums)
        phi = self.phi(si)
        h = h.transpose(1, 2).reshape(b, -1, pn, pn).to(phi.weight.dtype)
        if si == n - 1:
            return f_hat + phi(h).to(f_hat.dtype), None
        f_hat = f_hat + phi(F.interpolate(h, size=(hw, hw), mode="bicubic")).to(f_hat.dtype)
        pn1 = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn1, pn1), mode="area").view(b, -1, pn1 * pn1).transpose(1, 2)

    def tokens_to_fhat(self, tokens: torch.Tensor) -> torch.Tensor:
        """All scales' tokens [N, L] -> f_hat [N, Cvae, H, W] (the same sums as inference)."""
        sc = self.cfg.scales
        hw = self.patch_nums[-1]
        f_hat = torch.zeros(tokens.shape[0], self.cfg.cvae, hw, hw, device=tokens.device)  # fp32 sums (next_scale)
        for si in range(len(sc)):
            f_hat, _ = self.next_scale(si, f_hat, self.quantize.embedding(tokens[:, sc.begins[si]:sc.ends[si]]))
        return f_hat

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """[N,Cvae,H,W] -> images in [-1, 1], [N,3,H',W'] fp32 (a half decoder's output is clamped and
        mapped to pixels in fp32: no half Clip, and no rounding of 255 x in 8 bits of bf16 mantissa)."""
        x = self.post_quant_conv(f_hat.to(self.post_quant_conv.weight.dtype))
        return self.decoder(x).float().clamp(-1, 1)

    def latents_to_images(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat -> uint8 RGB [N, H, W, 3] (the reference demo's mapping, then the nearest upscale)."""
        x = self.fhat_to_img(f_hat).add(1).mul(0.5)
        if self.cfg.image_upscale > 1:
            x = F.interpolate(x, scale_factor=self.cfg.image_upscale, mode="nearest")
        return x.mul(255).permute(0, 2, 3, 1).to(torch.uint8).contiguous()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.latents_to_images(self.tokens_to_fhat(tokens))

    # -- the encoder side (training the demo, tests) -----------------------------------------------
    def image_to_tokens(self, img: torch.Tensor) -> torch.Tensor:
        """Images [N,3,H,W] in [-1, 1] -> multi-scale tokens [N, L] (residual quantization, L2 nearest)."""
        f = self.quant_conv(self.encoder(img))
        return torch.cat(self.quantize_scales(f)[0], 1)

    def quantize_scales(self, f: torch.Tensor):
        """f_to_idxBl_or_fhat: per-scale token ids [N, pn*pn] and the final f_hat (no gradients)."""
        b, c, hh, ww = f.shape
        rest, f_hat = f.detach().clone(), torch.zeros_like(f)
        emb = self.quantize.embedding.weight.detach()
        ids = []
        n = len(self.patch_nums)
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(rest, size=(pn, pn), mode="area") if si != n - 1 else rest
            z = z.permute(0, 2, 3, 1).reshape(-1, c)
            d = z.square().sum(1, keepdim=True) + emb.square().sum(1) - 2 * z @ emb.T
            idx = d.argmin(1).view(b, pn * pn)
            h = self.quantize.embedding(idx).transpose(1, 2).reshape(b, c, pn, pn)
            if si != n - 1:
                h = F.interpolate(h, size=(hh, ww), mode="bicubic")
            h = self.phi(si)(h)
            f_hat, rest = f_hat + h, rest - h
            ids.append(idx)
        return ids, f_hat

    def next_scale_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """idxBl_to_var_input: tokens [N, L] -> teacher-forcing inputs of scales 1.. [N, L - first_l, Cvae]."""
        sc = self.cfg.scales
        hw = self.patch_nums[-1]
        f_hat = torch.zeros(tokens.shape[0], self.cfg.cvae, hw, hw, dtype=self.codebook().dtype, device=tokens.device)
        out = []
        for si in range(len(sc) - 1):
            f_hat, nxt = self.next_scale(si, f_hat, self.quantize.embedding(tokens[:, sc.begins[si]:sc.ends[si]]))
            out.append(nxt)
        return torch.cat(out, 1)


# -- catalog: VAR's released models --------------------------------------------------------------
VAR_DEPTHS = (16, 20, 24, 30, 36)  # var_d16.pth ...: 256 px, except d36 (512 px, shared AdaLN)


class VARCatalog(Catalog):
    """`var-d{16,20,24,30}` (256 px) and `var-d36` (512 px) with the multi-scale VQVAE."""

    family = "var"
    config_class = VARConfig
    checkpoint_marker = "lvl_embed."
    hint = "var-d16|var-d20|var-d24|var-d30|var-d36"
    tokenizer_grid = None  # the released patch_nums fix the image size

    def names(self):
        return [f"var-d{d}" for d in VAR_DEPTHS]

    def canonical(self, name):
        v = name.lower().replace("_", "-")
        return f"var-d{int(v[5:])}" if v.startswith("var-d") and v[5:].isdigit() and int(v[5:]) in VAR_DEPTHS else None

    def config(self, name, overrides=None, image_size=None):
        depth = int(name[5:])
        native = 512 if depth == 36 else 256
        if image_size not in (None, native):
            raise ArexportError(f"{name} generates {native} px images (its released patch_nums); --image-size {image_size} does not apply")
        # width and heads follow an overridden depth (64 x depth, depth heads) unless given too
        kw = {"depth": depth, "patch_nums": VAR_512 if depth == 36 else VAR_256, "shared_aln": depth == 36, **(overrides or {})}
        try:
            return VARConfig(**kw)
        except (ValueError, TypeError) as e:
            raise ArexportError(f"invalid model config: {e}") from None


CATALOG = VARCatalog()
