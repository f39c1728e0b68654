"""One request format for the deployments: a plain dict (JSON-able), checked before anything is queued.

    {"classes": [3, 7]}            class-conditional models, one image per id
    {"prompts": ["a 7", "a 1"]}    text-to-image models, one image per prompt
    optional: "seed" (0 <= seed < 2**63, default 0), "method", "options" (dict), "images" (bool,
    default True), "timeout" (s), and the sampling fields of POST /generate: cfg_scale, cfg_interval,
    cfg_schedule, cfg_power, temperature, top_k, top_p.
The answer: {"tokens": [[int]] [N, n_tokens], "images": uint8 [N, H, W, 3] or None, "seconds": float}.
Same request, same engine: the same tokens as `arexport generate` and the service alone.
"""

from __future__ import annotations

import math
from typing import Any

from arexport.errors import ArexportError

SAMPLING_FIELDS = ("cfg_scale", "cfg_interval", "cfg_schedule", "cfg_power", "temperature", "top_k", "top_p")
FIELDS = {"classes", "prompts", "seed", "method", "options", "images", "timeout", *SAMPLING_FIELDS}
MAX_IMAGES = 64  # images per request (candidates of test-time scaling included), as `arexport serve`


def submit(service, request: dict[str, Any], max_images: int = MAX_IMAGES):
    """Check `request` and submit it to a GenerationService; returns its Future (of a serving Response).
    A bad request raises ArexportError naming the bad field, before anything is queued."""
    if not isinstance(request, dict):
        raise ArexportError(f"a request is a dict, got {type(request).__name__}")
    unknown = sorted(set(request) - FIELDS)
    if unknown:
        raise ArexportError(f"unknown request field(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    classes, prompts = request.get("classes"), request.get("prompts")
    if (classes is None) == (prompts is None):
        raise ArexportError("send classes (class-conditional models) or prompts (text-to-image models), one of them")
    n = len(classes if classes is not None else prompts)
    options = dict(request.get("options") or {})
    method = service.gen.request_method(request.get("method"), options)  # hooks: built-in names only
    rows = n * getattr(method.options, "candidates", 1)
    if not 1 <= rows <= max_images:
        raise ArexportError(f"a request makes 1..{max_images} images (candidates included), this one {rows}")
    sampling = {k: request.get(k) for k in SAMPLING_FIELDS}
    for k in ("cfg_scale", "cfg_power", "temperature", "top_p"):
        if sampling[k] is not None and not math.isfinite(float(sampling[k])):
            raise ArexportError(f"{k} must be a finite number")
    if sampling["cfg_interval"] is None:
        sampling["cfg_interval"] = -1
    seed = request.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ArexportError(f"seed must be an integer, got {seed!r}")
    return service.submit(classes, method=request.get("method"), options=options,
                          sampling=service.gen.sampling_params(**sampling), seed=seed,
                          images=bool(request.get("images", True)), timeout=request.get("timeout"), prompts=prompts)


def answer(response) -> dict[str, Any]:
    """A serving Response as the deployments' answer dict."""
    return {"tokens": response.tokens.tolist(), "images": response.images, "seconds": response.seconds}
