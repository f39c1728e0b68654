"""LlamaGen VQ-16 decoder path: codebook lookup (l2-normalised) -> post_quant_conv -> CNN decoder.

Module and parameter names match `tokenizer/tokenizer_image/vq_model.py` so the reference
checkpoint (a dict with a `model` entry holding encoder + decoder + quantizer) loads directly; the
encoder half is ignored. Output pixels follow torchvision's `save_image(normalize=True,
value_range=(-1, 1))`: uint8(clamp(127.5 x + 128, 0, 255)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from arexport.models.checkpoint import load_into, read_state_dict


@dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple = field(default=(1, 1, 2, 2, 4))
    num_res_blocks: int = 2


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


def _swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 conv projections."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).transpose(1, 2)
        k = self.k(h).reshape(b, c, hh * ww)
        v = self.v(h).reshape(b, c, hh * ww)
        w = torch.softmax(torch.bmm(q, k) * (c ** -0.5), dim=2)  # [b, q_pix, k_pix]
        out = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """CNN decoder: conv_in, mid [res, attn, res], per level (num_res_blocks + 1) res blocks
    (attention after each at the lowest resolution), nearest x2 upsample + conv, GroupNorm, swish."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in), AttnBlock(block_in), ResnetBlock(block_in, block_in)])
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(n)):
            blk = nn.Module()
            out = cfg.ch * cfg.ch_mult[level]
            res, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                res.append(ResnetBlock(block_in, out))
                block_in = out
                if level == n - 1:
                    attn.append(AttnBlock(block_in))
            blk.res, blk.attn = res, attn
            if level != 0:
                blk.upsample = Upsample(block_in)
            self.conv_blocks.append(blk)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for i, blk in enumerate(self.conv_blocks):
            for j, res in enumerate(blk.res):
                h = res(h)
                if len(blk.attn):
                    h = blk.attn[j](h)
            if i != len(self.conv_blocks) - 1:
                h = blk.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Quantize(nn.Module):
    """The codebook as the reference tokenizers name it (`quantize.embedding.weight`)."""

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)


def init_decoder_random_(module: nn.Module, seed: int) -> nn.Module:
    """In place, for random-weight image decoders: GroupNorm weights 1, biases 0, every other parameter
    ~ N(0, 1/fan_in), drawn in parameter order."""
    g = torch.Generator().manual_seed(seed)
    norm_weights = {id(m.weight) for m in module.modules() if isinstance(m, nn.GroupNorm) and m.weight is not None}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if id(p) in norm_weights:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5)
    return module


class VQDecoder(nn.Module):
    """Tokens [N, h*w] -> uint8 RGB images [N, H, W, 3]."""

    def __init__(self, cfg: VQConfig = VQConfig()):
        super().__init__()
        self.cfg = cfg
        self.quantize = Quantize(cfg.codebook_size, cfg.codebook_embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def codebook(self) -> torch.Tensor:
        """The raw codebook rows [codebook_size, embed_dim]: the latents LANTERN's neighbour search reads
        (its generate_codebook.py takes `quantize.embedding.weight` as stored)."""
        return self.quantize.embedding.weight

    def decode_float(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N, g*g] int64 -> decoder output [N, 3, 16g, 16g] in about [-1, 1]."""
        n, t = tokens.shape
        g = int(round(t ** 0.5))
        cb = F.normalize(self.quantize.embedding.weight, p=2, dim=-1)  # decoding looks up l2-normalised rows
        z = cb[tokens].reshape(n, g, g, -1).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.decode_float(tokens)
        return to_uint8_image(x)

    def init_random(self, seed: int = 0) -> "VQDecoder":
        return init_decoder_random_(self, seed)


def to_uint8_image(x: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] float in [-1,1] -> [N,H,W,3] uint8, as torchvision's normalize + save does."""
    return torch.clamp(127.5 * x.float() + 128.0, 0.0, 255.0).permute(0, 2, 3, 1).to(torch.uint8).contiguous()


def load_vq_decoder(path: str, cfg: VQConfig = VQConfig()) -> VQDecoder:
    """Load the decoder half of a LlamaGen VQ checkpoint (encoder keys are ignored)."""
    model = VQDecoder(cfg)
    sd = read_state_dict(path)
    keep = ("decoder.", "post_quant_conv.", "quantize.embedding.")
    sd = {k: v for k, v in sd.items() if k.startswith(keep)}
    load_into(model, sd, source=str(path))
    return model.eval()
