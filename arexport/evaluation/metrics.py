"""FID, precision/recall/density/coverage and Inception Score from feature vectors; reference statistics files.

FID is `arexport.quality.frechet_distance` (symmetric eigendecompositions) on (mean, covariance) of the
features; it agrees with pytorch-fid's `calculate_frechet_distance` (scipy `sqrtm`) to about 1e-9
relative on well-conditioned statistics (tests/test_evaluation.py). Precision/recall (Kynkaanniemi et
al. 2019) and density/coverage (Naeem et al. 2020) are the `prdc` package's k-nearest-neighbour
estimates. A reference statistics file is an .npz with `mu` [d] and `sigma` [d, d] (pytorch-fid's
layout), optionally `features` [N, d] (needed for precision/recall) and `feature_net` (checked).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from arexport.errors import ArexportError
from arexport.quality import feature_stats, frechet_distance

MAX_PRDC = 10_000  # images per side for precision/recall: the distance matrix is N_real x N_fake float64 (800 MB at the limit)
MAX_STATS_DIM = 8192  # feature dims in a statistics file (sigma is dim^2 float64)


@dataclass
class Reference:
    """What generated images are compared with: statistics, and the features themselves when known."""

    mu: np.ndarray  # [d]
    sigma: np.ndarray  # [d, d]
    n: int  # images behind the statistics (0 when the file does not say)
    features: Optional[np.ndarray] = None  # [N, d], for precision/recall
    feature_net: Optional[str] = None

    @classmethod
    def from_features(cls, features: np.ndarray, feature_net: str) -> "Reference":
        mu, sigma = feature_stats(features)
        return cls(mu, sigma, len(features), features, feature_net)

    def save(self, path: str | Path, with_features: bool = True) -> None:
        """Write the .npz (atomically): mu, sigma, n, feature_net, and the features unless told not to."""
        from arexport.fileio import atomic_write_bytes

        arrays = {"mu": self.mu, "sigma": self.sigma, "n": np.int64(self.n), "feature_net": np.str_(self.feature_net or "")}
        if with_features and self.features is not None:
            arrays["features"] = self.features.astype(np.float32)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())


def load_reference(path: str | Path, feature_net: str, dim: int) -> Reference:
    """Read a statistics .npz and check it matches the feature network (name when recorded, and dimension)."""
    p = Path(path)
    if not p.is_file():
        raise ArexportError(f"reference statistics file not found: {path}")
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            if not {"mu", "sigma"} <= keys:
                raise ArexportError(f"{path} is not a statistics file: it needs arrays 'mu' and 'sigma' (has {sorted(keys)})")
            shapes = {k: z[k].shape for k in ("mu", "sigma")}  # npz members load lazily: a header read per array
            d = shapes["mu"][0] if len(shapes["mu"]) == 1 else -1
            if d < 1 or d > MAX_STATS_DIM or shapes["sigma"] != (d, d):
                raise ArexportError(f"{path}: mu {shapes['mu']} and sigma {shapes['sigma']} are not [d] and [d, d] with d <= {MAX_STATS_DIM}")
            net = str(z["feature_net"]) if "feature_net" in keys else None
            if net and net != feature_net:
                raise ArexportError(f"{path} holds {net} features, but --features is {feature_net}")
            if d != dim:
                raise ArexportError(f"{path} holds {d}-d statistics, but {feature_net} features are {dim}-d")
            feats = z["features"].astype(np.float64) if "features" in keys else None
            if feats is not None and (feats.ndim != 2 or feats.shape[1] != d):
                raise ArexportError(f"{path}: features {feats.shape} do not match mu's {d} dims")
            n = int(z["n"]) if "n" in keys else (len(feats) if feats is not None else 0)
            return Reference(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), n, feats, net)
    except (OSError, ValueError) as e:
        raise ArexportError(f"cannot read reference statistics {path}: {e}") from None


def fid(features: np.ndarray, ref: Reference) -> float:
    """Frechet distance between the Gaussian fitted to `features` [N, d] and the reference's."""
    mu, sigma = feature_stats(features)
    return frechet_distance(mu, sigma, ref.mu, ref.sigma)


def prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Precision, recall, density, coverage with k nearest neighbours (the `prdc` package)."""
    try:
        from prdc import compute_prdc
    except ImportError:
        raise ArexportError("precision/recall need the prdc package: pip install 'arexport[eval]'") from None
    if min(len(real), len(fake)) <= k:
        raise ArexportError(f"precision/recall with k={k} need more than {k} images on each side "
                            f"(have {len(real)} reference, {len(fake)} generated)")
    if max(len(real), len(fake)) > MAX_PRDC:
        raise ArexportError(f"precision/recall take at most {MAX_PRDC} images a side (have {len(real)} reference, {len(fake)} generated)")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the set sizes
        out = compute_prdc(real_features=real.astype(np.float32), fake_features=fake.astype(np.float32), nearest_k=k)
    return {name: float(v) for name, v in out.items()}


def inception_score(logits: np.ndarray, splits: int = 10, shuffle_seed: int = 2020) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split of the images: (mean, std) over splits (Salimans et al. 2016).
    The images are shuffled (fixed seed) before splitting, so a folder sorted by class does not give
    one-class splits."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    p = p[np.random.default_rng(shuffle_seed).permutation(len(p))]
    scores = []
    for part in np.array_split(p, min(splits, len(p))):
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(py, 1e-30, None)))).sum(1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


@dataclass
class EvalResult:
    feature_net: str
    n_generated: int
    n_reference: int
    fid: float
    precision: Optional[float] = None
    recall: Optional[float] = None
    density: Optional[float] = None
    coverage: Optional[float] = None
    inception_score: Optional[float] = None  # with the feature network's classifier (IS proper only for Inception)
    inception_score_std: Optional[float] = None
    notes: list[str] = field(default_factory=list)  # what was not computed, and why

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(features: np.ndarray, logits: Optional[np.ndarray], ref: Reference, feature_net: str, k: int = 5) -> EvalResult:
    """All metrics of generated features [N, d] (and logits [N, C]) against a reference."""
    if len(features) < 2:
        raise ArexportError(f"FID needs at least 2 generated images, got {len(features)}")
    out = EvalResult(feature_net, len(features), ref.n, fid(features, ref))
    if len(features) <= features.shape[1]:
        out.notes.append(f"{len(features)} images for {features.shape[1]}-d features: the covariance is singular and FID is "
                         f"biased upwards; use more images than dimensions to compare with published numbers")
    if ref.features is None:
        out.notes.append("precision/recall: the reference is statistics only (save it with its features: --save-ref)")
    else:
        out.precision, out.recall, out.density, out.coverage = (prdc(ref.features, features, k)[m] for m in
                                                                ("precision", "recall", "density", "coverage"))
    if logits is None:
        out.notes.append(f"Inception Score: not available ({'no classifier head' if feature_net == 'inception' else 'no logits'})")
    else:
        out.inception_score, out.inception_score_std = inception_score(logits)
    return out
