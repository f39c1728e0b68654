"""The Chameleon VQGAN decoder Lumina-mGPT decodes its images with (transformers ships the encoder only).

Architecture: the taming-transformers VQGAN decoder as Chameleon's release configures it (the
official `vqgan.yaml`; transformers' ChameleonVQVAEConfig carries the same numbers): codebook lookup
(rows as stored, no normalisation) -> post_quant_conv -> conv_in, mid [res, attn, res], per level
from the lowest resolution up num_res_blocks + 1 res blocks (attention after each where the level's
resolution is in attn_resolutions), nearest x2 upsample + 3x3 conv, GroupNorm(32), swish, conv_out.
Module and parameter names are the released checkpoint's (`decoder.up.{level}.block.{i}.conv1`,
`decoder.mid.attn_1.q`, `post_quant_conv`, `quantize.embedding.weight`), so Meta's `vqgan.ckpt`
(a torch.save dict whose `state_dict` entry holds encoder, decoder, quantizer and loss weights) loads
with the weights-only reader; the encoder and loss entries are ignored.

Pixels: the official ImageTokenizer's conversion, ((clamp(x, -1, 1) + 1) / 2) * 255 cast to uint8
(truncation, not rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from arexport.errors import CheckpointError
from arexport.models.checkpoint import load_into, read_state_dict
from arexport.models.vq import AttnBlock, ResnetBlock, Upsample, _norm, _swish

KEEP = ("decoder.", "post_quant_conv.", "quantize.embedding.")  # what decoding reads of vqgan.ckpt


@dataclass(frozen=True)
class ChameleonVQConfig:
    """The decoder's half of vqgan.yaml (ddconfig, n_embed, embed_dim), as ChameleonVQVAEConfig names it."""

    num_embeddings: int = 8192
    embed_dim: int = 256
    latent_channels: int = 256  # z_channels
    base_channels: int = 128  # ch
    channel_multiplier: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple = ()
    resolution: int = 512  # the training resolution: it places attn_resolutions, not the output size
    attn_type: str = "vanilla"
    out_channels: int = 3

    @classmethod
    def from_hf(cls, vq_config) -> "ChameleonVQConfig":
        """From transformers' ChameleonVQVAEConfig (the checkpoint's config.json `vq_config`)."""
        if vq_config.attn_type not in ("vanilla", "none"):
            raise CheckpointError(f"Chameleon VQGAN attn_type {vq_config.attn_type!r} is not supported (vanilla or none)")
        return cls(num_embeddings=vq_config.num_embeddings, embed_dim=vq_config.embed_dim,
                   latent_channels=vq_config.latent_channels, base_channels=vq_config.base_channels,
                   channel_multiplier=tuple(vq_config.channel_multiplier), num_res_blocks=vq_config.num_res_blocks,
                   attn_resolutions=tuple(vq_config.attn_resolutions or ()), resolution=vq_config.resolution,
                   attn_type=vq_config.attn_type)


def _attn(c: int, kind: str) -> nn.Module:
    return AttnBlock(c) if kind == "vanilla" else nn.Identity()


class ChameleonDecoder(nn.Module):
    """z [N, latent_channels, h, w] -> [N, 3, 16h, 16w] (with 5 levels) in about [-1, 1]."""

    def __init__(self, cfg: ChameleonVQConfig):
        super().__init__()
        n = len(cfg.channel_multiplier)
        block_in = cfg.base_channels * cfg.channel_multiplier[-1]
        res = cfg.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.latent_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = _attn(block_in, cfg.attn_type)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        levels: list[nn.Module] = []
        for level in reversed(range(n)):  # built lowest resolution first, stored by level index
            up = nn.Module()
            out = cfg.base_channels * cfg.channel_multiplier[level]
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, out))
                block_in = out
                if res in cfg.attn_resolutions:
                    up.attn.append(_attn(block_in, cfg.attn_type))
            if level != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Quantize(nn.Module):
    def __init__(self, n: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n, dim)


class ChameleonVQDecoder(nn.Module):
    """tokens [N, rows * (cols + 1)] (each row closed by the new-line id V) -> uint8 RGB [N, 16 rows,
    16 cols, 3] (5 levels): the new-line column dropped, then the official decode."""

    def __init__(self, cfg: ChameleonVQConfig, rows: int, cols: int):
        super().__init__()
        self.cfg, self.rows, self.cols = cfg, rows, cols
        self.quantize = Quantize(cfg.num_embeddings, cfg.embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.latent_channels, 1)
        self.decoder = ChameleonDecoder(cfg)

    def decode_float(self, ids: torch.Tensor) -> torch.Tensor:
        """codebook ids [N, rows, cols] -> decoder output [N, 3, H, W] (float, about [-1, 1])."""
        z = self.quantize.embedding(ids).permute(0, 3, 1, 2)  # [N, embed_dim, rows, cols]
        return self.decoder(self.post_quant_conv(z))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.view(tokens.shape[0], self.rows, self.cols + 1)[:, :, : self.cols]
        V = self.cfg.num_embeddings
        ids = torch.minimum(torch.maximum(ids, ids.new_zeros(())), ids.new_tensor(V - 1))  # no int64 Clip (TensorRT)
        x = self.decode_float(ids).float()
        # official: ((clamp(x, -1, 1) + 1) / 2) * 255, then a uint8 cast that truncates
        return (((x.clamp(-1.0, 1.0) + 1.0) / 2.0) * 255.0).permute(0, 2, 3, 1).to(torch.uint8).contiguous()

    def codebook(self) -> torch.Tensor:
        """[V + 1, embed_dim]: the codebook and a zero row for the new-line id (LANTERN / VVS
        neighbourhoods; new-line is forced, so its row only has to exist)."""
        w = self.quantize.embedding.weight
        return torch.cat([w, w.new_zeros(1, w.shape[1])])


def load_chameleon_vqgan(path: str, cfg: ChameleonVQConfig, rows: int, cols: int,
                         codebook: torch.Tensor | None = None) -> ChameleonVQDecoder:
    """The decoder of a released vqgan.ckpt (weights-only read; encoder and loss entries ignored).
    With `codebook` (the language model checkpoint's copy, model.vqmodel.quantize), the file's must
    equal it: a vqgan.ckpt of another model decodes every token to the wrong latent."""
    sd = read_state_dict(path)
    sd = {k: v for k, v in sd.items() if k.startswith(KEEP)}
    model = ChameleonVQDecoder(cfg, rows, cols)
    load_into(model, sd, source=str(path))
    if codebook is not None and not torch.equal(model.quantize.embedding.weight.to(codebook.dtype), codebook.detach().cpu()):
        raise CheckpointError(f"{path}: its codebook (quantize.embedding.weight) differs from the checkpoint's "
                              "model.vqmodel.quantize: the VQGAN file belongs to another model")
    return model.eval()
