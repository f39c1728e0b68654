"""Verifiers and scorers for test-time scaling (GridAR, best-of-N): small protocols, pluggable.

A *verifier* judges partial candidates mid-generation: it gets a `PartialCanvas` and returns a
bool tensor [N] (True = feasible, keep generating it). A *scorer* ranks finished images: it gets
uint8 images [N, H, W, 3] and the conditions, and returns float scores [N] (higher is better).
Pass your own as Python callables, or name a built-in: `digits` (the demo's CNN judge) and
`accept-all` (a verifier that keeps everything). On the CLI, `module:attribute` also works.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from arexport.errors import ArexportError
from arexport.families import Conditions


@dataclass
class PartialCanvas:
    """A partial image: visible token rows decoded after padding the canvas by repeating them."""

    canvas: torch.Tensor  # uint8 [N, H, W, 3]: the whole padded canvas, decoded
    visible: torch.Tensor  # uint8 [N, h, W, 3]: its top, the rows actually generated
    tokens: torch.Tensor  # [N, visible_rows * grid]
    fraction: float  # visible rows / grid rows
    conditions: Conditions


def accept_all(partial: PartialCanvas) -> torch.Tensor:
    """Keeps every candidate (turns GridAR into N independent samples)."""
    return torch.ones(partial.tokens.shape[0], dtype=torch.bool)


def _digit_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 8s, 8s, 3] demo images -> classifier input [N, 1, 8, 8] in [0, 1]."""
    n, h, w, _ = images.shape
    s = h // 8
    grey = images[:, s // 2::s, s // 2::s, 0].float() / 255.0
    return grey.reshape(n, 1, 8, 8)


def _wanted_prob(p: torch.Tensor, conditions: Conditions) -> torch.Tensor:
    """[N] the judge's probability of each requested class (class-conditional demos), or, when the
    conditions are captions with no class id (demo-t2i prompts), of its most likely class: how
    clearly the candidate reads as any one digit."""
    if conditions.classes is None:
        return p.max(1).values
    return p.gather(1, conditions.classes.cpu().long()[:, None])[:, 0]


class DigitVerifier:
    """Demo verifier: the CNN judge on the padded canvas; feasible when the requested class (for
    prompts, the judge's top class) gets at least `min_prob` of the probability mass."""

    def __init__(self, min_prob: float = 0.2):
        self.min_prob = min_prob

    def __call__(self, partial: PartialCanvas) -> torch.Tensor:
        from arexport.quality import judge

        with torch.no_grad():
            p = torch.softmax(judge("cnn")(_digit_input(partial.canvas.cpu())), -1)
        return _wanted_prob(p, partial.conditions) >= self.min_prob


class DigitScorer:
    """Demo scorer: the CNN judge's probability of the requested class (for prompts: of its top
    class), in float64: confident
    candidates all round to 1.0 in float32, and the pick among such ties would rest on the last bit
    of the judge's arithmetic (which differs between CPUs)."""

    def __call__(self, images: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        from arexport.quality import judge

        with torch.no_grad():
            p = torch.softmax(judge("cnn")(_digit_input(images.cpu())).double(), -1)
        return _wanted_prob(p, conditions)


BUILTIN_VERIFIERS = {"digits": DigitVerifier, "accept-all": lambda: accept_all}
BUILTIN_SCORERS = {"digits": DigitScorer}


HOOK_OPTIONS = {"verifier": BUILTIN_VERIFIERS, "scorer": BUILTIN_SCORERS}


def request_safe_options(options: dict) -> None:
    """Refuse method options a request must not set: `verifier`/`scorer` may only name built-ins ('auto'
    included); `reformulate` is for the Python API; `head_threads` sizes a server session; `orders` and
    `draft_head` name files on the server."""
    for k, builtins in HOOK_OPTIONS.items():
        v = options.get(k, "auto")
        if not isinstance(v, str):  # a callable or any other object comes only from the Python API
            raise ArexportError(f"option {k} must be the name of a built-in {k} (a string)")
        if v != "auto" and v not in builtins:
            raise ArexportError(f"{k} {v!r} is not a built-in {k} ({', '.join(builtins)}); module:callable hooks are "
                                "set by the operator (CLI or Python API), never by a request")
    if options.get("reformulate") is not None:
        raise ArexportError("reformulate is a Python API hook; a request cannot set it")
    if options.get("head_threads") is not None:  # a new session per value, sized by the request
        raise ArexportError("head_threads sizes the server's draft-head session; the operator sets it, never a request")
    for k in ("orders", "draft_head"):  # lpd's orders file, eagle/lantern/vvs's head: paths on the server
        if options.get(k) is not None:
            raise ArexportError(f"{k} names a file on the server; the operator passes it (CLI or Python API, or "
                                "`build-head --into` for a head), never a request")


def call_hook(fn, what: str, n: int, *args) -> torch.Tensor:
    """Call a verifier/scorer; its output as a tensor of n values, or a named error when it raises or
    returns anything else."""
    name = getattr(fn, "__name__", type(fn).__name__)
    try:
        result = fn(*args)
    except Exception as e:  # an operator's hook: report it by name, whatever it raised
        raise ArexportError(f"{what} {name!r} failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    try:
        out = torch.as_tensor(result)
    except (TypeError, ValueError, RuntimeError):
        out = None
    if out is None or out.shape != (n,):
        got = f"shape {list(out.shape)}" if out is not None else type(result).__name__
        raise ArexportError(f"{what} {name!r} must return {n} values (one per candidate), got {got}")
    return out


def resolve(obj, builtins: dict, what: str, image_kind: str):
    """A callable from a callable, a built-in name, 'auto' (digits for the demo) or 'module:attr'."""
    if callable(obj):
        return obj
    if obj in (None, "auto"):
        if image_kind == "digits":
            return builtins["digits"]()
        raise ArexportError(f"gridar needs a {what} for this model: pass --{what} module:callable "
                            f"(built-ins: {', '.join(builtins)})")
    if obj in builtins:
        return builtins[obj]()
    if isinstance(obj, str) and ":" in obj:
        mod, attr = obj.split(":", 1)
        try:
            found = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ArexportError(f"cannot load {what} {obj!r}: {e}") from None
        return found() if isinstance(found, type) else found
    raise ArexportError(f"unknown {what} {obj!r}; built-ins: {', '.join(builtins)}, or module:callable")
