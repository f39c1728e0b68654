"""Demo quality metrics: class accuracy under a digit classifier and feature (Frechet) distance.

Two judges of different architecture ship with the package: `cnn` (DigitCNN) and `mlp`
(DigitMLP). Reference feature statistics come from the held-out 20% of scikit-learn's digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

N_LEVELS = 17  # demo tokens are grey levels 0..16
GRID = 8
WEIGHTS_DIR = Path(__file__).parent / "models" / "weights"  # a path only: importing arexport.models is not needed


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


JUDGES = {"cnn": (DigitCNN, "digit-cnn.safetensors"), "mlp": (DigitMLP, "digit-mlp.safetensors")}


@lru_cache(maxsize=None)
def judge(name: str = "cnn") -> torch.nn.Module:
    """A packaged digit classifier by name (cached)."""
    from safetensors.torch import load_file

    from arexport.errors import ArexportError

    cls, fname = JUDGES[name]
    path = WEIGHTS_DIR / fname
    if not path.exists():
        raise ArexportError(f"packaged weights missing: {path} (run scripts/train_demo.py)")
    module = cls()
    module.load_state_dict(load_file(str(path)), strict=True)
    return module.eval()


@lru_cache(maxsize=None)
def reference_stats(name: str = "cnn", split: str = "heldout") -> tuple[np.ndarray, np.ndarray]:
    """(mu, cov) of real-digit features for a judge; split 'heldout' or 'train'."""
    from safetensors.torch import load_file

    s = load_file(str(WEIGHTS_DIR / "digits-stats.safetensors"))
    key = name if split == "heldout" else f"{name}_train"
    return s[f"{key}_mu"].numpy(), s[f"{key}_cov"].numpy()


@dataclass
class DigitScores:
    accuracy: float  # fraction classified as the requested class
    feature_distance: float  # Frechet distance of judge features vs held-out real digits
    n: int

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "feature_distance": self.feature_distance, "n": self.n}


@torch.no_grad()
def score_digits(tokens, classes, judge_name: str = "cnn") -> DigitScores:
    """Accuracy and feature distance of generated digits [N, 64] requested as `classes` [N]."""
    t = torch.as_tensor(np.asarray(tokens), dtype=torch.int64)
    return _score(tokens_to_input(t), classes, judge_name)


def images_to_input(images) -> torch.Tensor:
    """uint8 RGB images [N, 8s, 8s, 3] (s x s blocks per pixel) -> classifier input [N, 1, 8, 8] in [0, 1]:
    each block's mean grey level (models whose tokens are not grey levels, such as VAR's, are judged here)."""
    x = torch.as_tensor(np.asarray(images)).float().mean(-1) / 255.0
    return F.adaptive_avg_pool2d(x.unsqueeze(1), GRID)


@torch.no_grad()
def score_images(images, classes, judge_name: str = "cnn") -> DigitScores:
    """Accuracy and feature distance of generated digit images [N, H, W, 3] uint8 requested as `classes`."""
    return _score(images_to_input(images), classes, judge_name)


def _score(x: torch.Tensor, classes, judge_name: str) -> DigitScores:
    model = judge(judge_name)
    acc = float((model(x).argmax(1).numpy() == np.asarray(classes)).mean())
    mu, cov = feature_stats(model.features(x).numpy())
    rmu, rcov = reference_stats(judge_name)
    return DigitScores(acc, frechet_distance(mu, cov, rmu, rcov), len(x))
