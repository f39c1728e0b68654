"""Shared pieces of decoding loops: CFG row handling, results, the method registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from arexport.errors import ArexportError
from arexport.runtime.engine import Conditions, StepEngine
from arexport.runtime.sampling import SamplingParams, guided_logits

Progress = Optional[Callable[[int], None]]  # called with the number of newly finished tokens


@dataclass
class DecodeResult:
    """Raster-order tokens [B, n_tokens] plus method statistics (per batch)."""

    tokens: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # tensors for callers (not in JSON stats)


class CFGRows:
    """Classifier-free guidance doubles the batch as rows [cond; uncond] fed the same tokens."""

    def __init__(self, params: SamplingParams, batch: int):
        self.params = params
        self.batch = batch
        self.double = params.uses_cfg

    @property
    def rows(self) -> int:
        return 2 * self.batch if self.double else self.batch

    def conditions(self, engine: StepEngine, conds: Conditions) -> Conditions:
        """Conditions for all rows: the batch, then its null conditions when CFG is on."""
        conds = conds.to(engine.device)
        if not self.double:
            return conds
        null = engine.null_conditions(self.batch)
        if conds.mask is not None:  # LlamaGen reuses the caption's padding mask for the null rows
            null.mask = conds.mask.clone()
        return conds.cat(null)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image tensor [B, ...] -> per-row tensor [rows, ...]."""
        return torch.cat([x, x]) if self.double else x

    def guide(self, logits: torch.Tensor, active) -> torch.Tensor:
        """Per-row logits -> per-image guided logits (CFG where `active`)."""
        return guided_logits(logits, self.params, active)

    def active(self, token_index: torch.Tensor) -> torch.Tensor:
        """[B, ...] bool: whether CFG applies to the image token with that index (cfg_interval)."""
        if self.params.cfg_interval < 0:
            return torch.ones_like(token_index, dtype=torch.bool)
        return token_index <= self.params.cfg_interval + 1


class Method:
    """A decoding method: `generate(engines, conds, params, rng, progress)` -> DecodeResult."""

    name: str = "?"
    needs_draft: bool = False

    def generate(self, engine: StepEngine, conds: Conditions, params: SamplingParams, rng, progress: Progress = None,
                 draft: Optional[StepEngine] = None) -> DecodeResult:
        raise NotImplementedError


METHODS: dict[str, Callable[..., Method]] = {}


def register(name: str):
    """Class decorator adding a method to the registry under `name`."""
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def default_method(spec) -> str:
    """The method a model decodes with when none is named: `arpg` for ARPG models, else `ar`."""
    return "arpg" if spec.family == "arpg" else "ar"


def make_method(name: str, **options) -> Method:
    """Instantiate a registered method with its options; unknown names and options are errors."""
    from arexport.runtime import decoding  # noqa: F401  (registers the built-in methods)

    if name not in METHODS:
        raise ArexportError(f"unknown decoding method {name!r}; available: {', '.join(sorted(METHODS))}")
    try:
        return METHODS[name](**options)
    except TypeError as e:
        raise ArexportError(f"bad options for method {name}: {e}") from None


def parse_method_options(items, what: str = "--option") -> dict[str, Any]:
    """['window=16', 'init=random', ...] -> {'window': 16, 'init': 'random'}: ints, floats and
    true/false are typed, dashes in keys become underscores. `what` names the source in errors."""
    opts: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise ArexportError(f"bad {what} {it!r}: expected K=V")
        k, v = it.split("=", 1)
        opts[k.strip().replace("-", "_")] = _typed(v.strip())
    return opts


def _typed(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v
