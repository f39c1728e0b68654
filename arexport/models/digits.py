"""The demo's pixel "tokenizer" and scorers, for scikit-learn's 8x8 handwritten digits.

A token is one pixel's grey level 0..16 (17 tokens, 64 per image, raster order). The decoder turns
tokens into a visible RGB image (white ink on black, each pixel a `scale` x `scale` block). The
"codebook" places level l at angle (pi/2) l/16 on the unit circle: L2 distance grows with the level
difference (LANTERN's neighbours are adjacent grey levels) and cosine similarity is cos of the
angle between levels (VVS compares draft candidates by it), as with VQ-16's l2-normalised codes.
The classifiers that judge generated digits live in `arexport.quality`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from arexport.quality import GRID, N_LEVELS


class DigitsDecoder(nn.Module):
    """tokens [N, 64] (0..16) -> uint8 RGB [N, 8*scale, 8*scale, 3]."""

    def __init__(self, scale: int = 16):
        super().__init__()
        self.scale = scale

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        grey = (tokens.float().clamp(0, N_LEVELS - 1) * (255.0 / (N_LEVELS - 1))).round()
        img = grey.reshape(n, 1, GRID, GRID)
        img = F.interpolate(img, scale_factor=self.scale, mode="nearest")
        return img.expand(n, 3, -1, -1).permute(0, 2, 3, 1).to(torch.uint8).contiguous()

    def codebook(self) -> torch.Tensor:
        """[17, 2]: grey level l as the unit vector at angle (pi/2) l/16."""
        theta = torch.arange(N_LEVELS, dtype=torch.float32) / (N_LEVELS - 1) * (torch.pi / 2)
        return torch.stack([torch.cos(theta), torch.sin(theta)], 1)
