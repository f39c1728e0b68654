"""The demo's pixel "tokenizer" and scorers, for scikit-learn's 8x8 handwritten digits.

A token is one pixel's grey level 0..16 (17 tokens, 64 per image, raster order). The decoder turns
tokens into a visible RGB image (white ink on black, each pixel a `scale` x `scale` block). The
"codebook" places level l at angle (pi/2) l/16 on the unit circle: L2 distance grows with the level
difference (LANTERN's neighbours are adjacent grey levels) and cosine similarity is cos of the
angle between levels (VVS compares draft candidates by it), as with VQ-16's l2-normalised codes.
Two classifiers of different architecture score generated digits: `DigitCNN` (used by verifiers
and the demo's accuracy figure) and `DigitMLP` (an independent judge for methods that optimise
against the CNN). `frechet_distance` compares feature statistics (our offline "FID").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

N_LEVELS = 17
GRID = 8


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
        return img.to(torch.uint8).expand(n, 3, -1, -1).permute(0, 2, 3, 1).contiguous()

    def codebook(self) -> torch.Tensor:
        """[17, 2]: grey level l as the unit vector at angle (pi/2) l/16."""
        theta = torch.arange(N_LEVELS, dtype=torch.float32) / (N_LEVELS - 1) * (torch.pi / 2)
        return torch.stack([torch.cos(theta), torch.sin(theta)], 1)


def tokens_to_input(tokens: torch.Tensor) -> torch.Tensor:
    """tokens [N, 64] -> classifier input [N, 1, 8, 8] in [0, 1]."""
    return (tokens.float() / (N_LEVELS - 1)).reshape(-1, 1, GRID, GRID)


class DigitCNN(nn.Module):
    """Small CNN digit classifier; `features` is its 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


class DigitMLP(nn.Module):
    """A differently built judge: an MLP on raw pixels (no convolutions, no shared features)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.features(x))


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1-mu2||^2 + Tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2), via symmetric eigendecompositions."""
    def sqrt_psd(c):
        w, v = np.linalg.eigh((c + c.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    s1 = sqrt_psd(cov1)
    middle = sqrt_psd(s1 @ cov2 @ s1)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(middle))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a [N, d] feature matrix (float64)."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)
