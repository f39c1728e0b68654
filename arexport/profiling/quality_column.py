"""The cost beside the speed: a quality figure for every profiled config.

For the digits demos (models named demo*, class-conditional, with an image decoder) the packaged judges
score the images: class accuracy and the Frechet distance of judge features to held-out real digits
(arexport/quality.py). For every model, the config's tokens are compared with `ar`'s under the same
seed, conditions and sampler: the fraction of equal tokens (1.0 for a lossless method when sampling is
greedy) and the total-variation distance between the two token histograms (all positions pooled: a
distribution distance that stays meaningful when tokens are sampled, where equal seeds need not give
equal tokens even for lossless methods). Both are measured on `n_images` images outside the timing.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from arexport.quality import score_images
from arexport.runtime.generator import Generator

MAX_QUALITY_IMAGES = 10_000


def judged_by_digits(gen: Generator, prompts) -> bool:
    """Whether the demo judges apply: a digits demo with images, conditioned on classes."""
    return gen.spec.name.startswith("demo") and gen.engine.has_images and not prompts


def token_histogram_tv(a: np.ndarray, b: np.ndarray, vocab: int) -> float:
    """Total variation between the token frequency histograms of two token arrays (any shapes)."""
    ha = np.bincount(a.ravel(), minlength=vocab) / a.size
    hb = np.bincount(b.ravel(), minlength=vocab) / b.size
    return float(0.5 * np.abs(ha - hb).sum())


def measure_quality(gen: Generator, method: str, options: dict, classes: list, sampling, batch_size: int,
                    n_images: int, prompts: Optional[list] = None, seed: int = 0,
                    ar_cache: Optional[dict] = None) -> dict[str, Any]:
    """Quality of one config on `n_images` images (the profile's conditions cycled), next to `ar`'s.

    ar_cache: a dict kept across configs of one profile, so `ar` runs once per (conditions, seed)."""
    from arexport.errors import ArexportError

    if not 1 <= n_images <= MAX_QUALITY_IMAGES:
        raise ArexportError(f"--quality-images must be 1..{MAX_QUALITY_IMAGES}, got {n_images}")
    conds = prompts or classes
    conds = [conds[i % len(conds)] for i in range(n_images)]
    kw = {"prompts": conds} if prompts else {"classes": conds}
    judged = judged_by_digits(gen, prompts)
    run = dict(sampling=sampling, batch_size=batch_size, timings=False, seed=seed)
    res = gen.generate(**kw, method=method, method_options=options, images=judged, **run)
    out: dict[str, Any] = {"images": n_images, "seed": seed}
    if judged:
        s = score_images(res.images, conds, "cnn")
        out.update(judge="cnn", accuracy=s.accuracy, feature_distance=s.feature_distance)
    if method == "ar" and not options:
        out.update(tokens_equal_ar=1.0, token_tv_vs_ar=0.0)
        if ar_cache is not None:
            ar_cache[(tuple(conds), seed)] = res.tokens
        return out
    key = (tuple(conds), seed)
    ar_tokens = ar_cache.get(key) if ar_cache is not None else None
    if ar_tokens is None:
        try:
            gen.method("ar")
        except ArexportError as e:  # a family without raster decoding (VAR): no ar to compare with
            out["vs_ar"] = f"not available: {e}"
            return out
        ar_tokens = gen.generate(**kw, method="ar", images=False, **run).tokens
        if ar_cache is not None:
            ar_cache[key] = ar_tokens
    if ar_tokens.shape != res.tokens.shape:
        out["vs_ar"] = f"not comparable: ar tokens {ar_tokens.shape}, {method} tokens {res.tokens.shape}"
        return out
    out.update(tokens_equal_ar=float((ar_tokens == res.tokens).mean()),
               token_tv_vs_ar=token_histogram_tv(res.tokens, ar_tokens, int(max(ar_tokens.max(), res.tokens.max())) + 1))
    return out


def quality_rows(results) -> list[tuple[str, list[str]]]:
    """Rows for the profile table (metric, one cell per config); none when no config was measured."""
    qs = [getattr(r, "quality", None) or {} for r in results]
    if not any(qs):
        return []

    def cell(q, key, spec):
        v = q.get(key)
        return "-" if v is None else format(v, spec)

    rows = []
    if any("accuracy" in q for q in qs):
        rows.append(("judge accuracy", [cell(q, "accuracy", ".3f") for q in qs]))
        rows.append(("judge FD", [cell(q, "feature_distance", ".2f") for q in qs]))
    rows.append(("tokens = ar", [cell(q, "tokens_equal_ar", ".3f") for q in qs]))
    rows.append(("token TV vs ar", [cell(q, "token_tv_vs_ar", ".3f") for q in qs]))
    rows.append(("quality images", [str(q.get("images", "-")) for q in qs]))
    return rows
