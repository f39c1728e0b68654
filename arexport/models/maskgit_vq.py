"""MaskGIT-VQGAN decoder (the tokenizer RAR and MaskGIT use: 1024 codes, f16, 256 px), decode half.

Facts kept from 1d-tokenizer `modeling/modules/maskgit_vqgan.py` (`PretrainedTokenizer.decode`):
codebook lookup (raw embedding rows, no normalisation), conv_in, `num_res_blocks` mid residual
blocks, five up levels from the coarsest (residual blocks, then nearest x2 + conv except at level 0),
GroupNorm(32, eps 1e-6) + SiLU + conv_out, clamp to [0, 1]; pixels are uint8(255 x) truncated, as
its `sample_fn` writes them. Its residual block has two quirks reproduced here: convolutions have no
bias, and when a block changes width the shortcut is a 1x1 conv of the block's *output* (the input
is not carried). The "same" padding of its convolutions is padding k // 2 at stride 1.
Parameter names match `maskgit-vqgan-imagenet-f16-256.bin` (encoder keys are ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from arexport.errors import CheckpointError
from arexport.models.checkpoint import load_into, read_state_dict
from arexport.models.vq import Quantize, init_decoder_random_


@dataclass(frozen=True)
class MaskGITVQConfig:
    codebook_size: int = 1024
    z_channels: int = 256
    hidden_channels: int = 128
    channel_mult: tuple = field(default=(1, 1, 2, 2, 4))
    num_res_blocks: int = 2


def _conv(cin: int, cout: int, k: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, 1, k // 2, bias=bias)


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _gn(cin), _conv(cin, cout, 3, bias=False)
        self.norm2, self.conv2 = _gn(cout), _conv(cout, cout, 3, bias=False)
        self.nin_shortcut = _conv(cout, cout, 1, bias=False) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.nin_shortcut(h) if self.nin_shortcut is not None else x)


class UpLevel(nn.Module):
    def __init__(self, cfg: MaskGITVQConfig, level: int):
        super().__init__()
        mult = cfg.channel_mult
        cin = cfg.hidden_channels * (mult[-1] if level == len(mult) - 1 else mult[level + 1])
        cout = cfg.hidden_channels * mult[level]
        self.block = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout) for i in range(cfg.num_res_blocks)])
        if level != 0:
            self.upsample_conv = _conv(cout, cout, 3)

    def forward(self, x):
        for blk in self.block:
            x = blk(x)
        if hasattr(self, "upsample_conv"):
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: MaskGITVQConfig):
        super().__init__()
        top = cfg.hidden_channels * cfg.channel_mult[-1]
        self.conv_in = _conv(cfg.z_channels, top, 3)
        self.mid = nn.ModuleList([ResnetBlock(top, top) for _ in range(cfg.num_res_blocks)])
        self.up = nn.ModuleList([UpLevel(cfg, i) for i in range(len(cfg.channel_mult))])  # up[0] is the finest
        self.norm_out = _gn(cfg.hidden_channels * cfg.channel_mult[0])
        self.conv_out = _conv(cfg.hidden_channels * cfg.channel_mult[0], 3, 3)

    def forward(self, z):
        h = self.conv_in(z)
        for blk in self.mid:
            h = blk(h)
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class MaskGITDecoder(nn.Module):
    """Tokens [N, g*g] -> uint8 RGB images [N, 16g, 16g, 3]."""

    def __init__(self, cfg: MaskGITVQConfig = MaskGITVQConfig()):
        super().__init__()
        self.cfg = cfg
        self.quantize = Quantize(cfg.codebook_size, cfg.z_channels)
        self.decoder = Decoder(cfg)

    def codebook(self) -> torch.Tensor:
        """[codebook_size, z_channels]: the latents decoding looks up (raw rows)."""
        return self.quantize.embedding.weight

    def decode_float(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N, g*g] -> images [N, 3, 16g, 16g] clamped to [0, 1], fp32 (a half decoder's output is
        clamped and mapped to pixels in fp32)."""
        n, t = tokens.shape
        g = int(round(t ** 0.5))
        z = self.quantize.embedding(tokens).reshape(n, g, g, -1).permute(0, 3, 1, 2)
        return torch.clamp(self.decoder(z).float(), 0.0, 1.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.decode_float(tokens)
        return (x.float() * 255.0).permute(0, 2, 3, 1).to(torch.uint8).contiguous()

    def init_random(self, seed: int = 0) -> "MaskGITDecoder":
        return init_decoder_random_(self, seed)


def load_maskgit_decoder(path: str, cfg: MaskGITVQConfig = MaskGITVQConfig()) -> MaskGITDecoder:
    """Load the decode half of `maskgit-vqgan-imagenet-f16-256.bin` (encoder keys are ignored)."""
    sd = read_state_dict(path)
    if "quantize.embedding.weight" not in sd or not any(k.startswith("decoder.up.") for k in sd):
        kind = "a LlamaGen VQ-16 tokenizer" if any(k.startswith("decoder.conv_blocks.") for k in sd) else "not a MaskGIT-VQGAN tokenizer"
        raise CheckpointError(f"{path} is {kind}: RAR decodes with maskgit-vqgan-imagenet-f16-256.bin "
                              "(quantize.embedding + decoder.up.*)")
    model = MaskGITDecoder(cfg)
    load_into(model, {k: v for k, v in sd.items() if k.startswith(("decoder.", "quantize.embedding."))}, source=str(path))
    return model.eval()
