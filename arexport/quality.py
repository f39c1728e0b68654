"""Demo quality metrics: class accuracy under a digit classifier and feature (Frechet) distance.

Two judges of different architecture ship with the package: `cnn` (DigitCNN) and `mlp`
(DigitMLP). Reference feature statistics come from the held-out 20% of scikit-learn's digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from arexport.models.digits import DigitCNN, DigitMLP, feature_stats, frechet_distance, tokens_to_input
from arexport.models.registry import WEIGHTS_DIR, load_packaged

JUDGES = {"cnn": (DigitCNN, "digit-cnn.safetensors"), "mlp": (DigitMLP, "digit-mlp.safetensors")}


@lru_cache(maxsize=None)
def judge(name: str = "cnn") -> torch.nn.Module:
    """A packaged digit classifier by name (cached)."""
    cls, fname = JUDGES[name]
    return load_packaged(cls(), fname)


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
def predict(tokens, judge_name: str = "cnn") -> np.ndarray:
    """Class probabilities [N, 10] for digit token grids [N, 64]."""
    x = tokens_to_input(torch.as_tensor(np.asarray(tokens), dtype=torch.int64))
    return torch.softmax(judge(judge_name)(x), -1).numpy()


@torch.no_grad()
def score_digits(tokens, classes, judge_name: str = "cnn") -> DigitScores:
    """Accuracy and feature distance of generated digits [N, 64] requested as `classes` [N]."""
    t = torch.as_tensor(np.asarray(tokens), dtype=torch.int64)
    model = judge(judge_name)
    x = tokens_to_input(t)
    acc = float((model(x).argmax(1).numpy() == np.asarray(classes)).mean())
    mu, cov = feature_stats(model.features(x).numpy())
    rmu, rcov = reference_stats(judge_name)
    return DigitScores(acc, frechet_distance(mu, cov, rmu, rcov), len(t))
