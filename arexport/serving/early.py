"""Refusals the HTTP layer can give before the request is parsed (issue 38: a burst's refusals within 100 ms).

Under a burst the event loop parses every body (FastAPI, pydantic, the method's options) before the
service's admission can refuse it, on cores the worker also wants; the refusals waited behind that
work (175-570 ms p50). Where the answer is already known it is given earlier, with the status and
Retry-After admission would give (serving/admission.py), counted in /metrics the same way:
* before the body is read (the headers only): the service is closing (503), or not even one more
  image fits under the bound on outstanding images (429);
* after the body is read, before it is validated: a plain `json.loads` peek at `timeout` and the
  number of images (`classes`, `prompts`, `prompt`, OpenAI's `n`) — a lower bound on the request's
  cost, so a request refused at that bound (its deadline unreachable, or the bound exceeded) would be
  refused at its real cost too. A body the peek cannot read goes the full way (and gets its 4xx there).
Nothing admitted here is queued here: an admitted request is checked again by `submit` with its
real cost, after validation.
"""

from __future__ import annotations

import json
import math
from typing import Optional

from arexport.errors import ArexportError
from arexport.serving.admission import DeadlineUnreachable, Overloaded, ServiceClosed

GENERATION_PATHS = ("/generate", "/v1/images/generations")  # the POST paths that queue work
MAX_PEEK_BYTES = 64 << 10  # larger bodies (caption embeddings) are not peeked: parsing them is the cost


def refusal(e: Exception) -> tuple[int, str, Optional[dict]]:
    """(status, message, headers) of an admission refusal, as the endpoints answer it."""
    if isinstance(e, DeadlineUnreachable):
        return 503, str(e), {"Retry-After": str(math.ceil(e.retry_after))}
    if isinstance(e, Overloaded):
        return 429, str(e), {"Retry-After": str(math.ceil(e.retry_after))}
    return 503, str(e), None  # ServiceClosed


def before_body(service) -> Optional[tuple[int, str, Optional[dict]]]:
    """The refusal of any generation request right now (headers known, body not read), or None."""
    try:
        service.precheck(1, None)
    except ServiceClosed as e:
        return refusal(e)
    return None


def peek(body: bytes, path: str = "/generate") -> Optional[tuple[int, Optional[float]]]:
    """(images at least, timeout or None) from a JSON body, or None when it is not a plain object
    with well-formed fields of those names (validation then answers it). A valid request makes at
    least max(1, len(classes), len(prompts), OpenAI's n) images (before candidates)."""
    if len(body) > MAX_PEEK_BYTES:
        return None
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(raw, dict):
        return None
    timeout = raw.get("timeout")
    if timeout is not None and not (type(timeout) in (int, float) and math.isfinite(timeout) and timeout > 0):
        return None
    counts = [1] + [len(raw[k]) for k in ("classes", "prompts") if isinstance(raw.get(k), list)]
    if path.startswith("/v1/") and type(raw.get("n")) is int:
        counts.append(raw["n"])
    return max(counts), timeout


def before_parse(service, body: bytes, path: str) -> Optional[tuple[int, str, Optional[dict]]]:
    """The refusal of this body's request from its timeout and image count alone, or None."""
    got = peek(body, path)
    if got is None:
        return None
    n, timeout = got
    try:
        service.precheck(n, timeout)
    except ServiceClosed as e:
        return refusal(e)
    except ArexportError:  # too large for the server at all: the full path says so with its 400
        return None
    return None
