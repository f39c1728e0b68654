"""`lantern`: LANTERN relaxed acceptance on top of a drafter (`sd` by default, or `sjd`).

Neighbourhoods come from L2 distances between codebook latents (precomputed into the engine
directory at build time, or computed once from the decoder's codebook on the torch backend).
Options: k (neighbours searched, default 1000), delta (TV budget, default 0.1), lam (LANTERN++:
pooled mass <= (lam - 1) p(x); overrides delta), drafter ('sd' | 'sjd') and the drafter's own
options (gamma; window, init). delta = 0 reproduces the drafter exactly.
"""

from __future__ import annotations

from typing import Optional

from arexport.errors import ArexportError
from arexport.runtime.decoding.base import Method, register
from arexport.runtime.decoding.sd import SD
from arexport.runtime.decoding.sjd import SJD
from arexport.runtime.speculative import LanternRule


@register("lantern")
class Lantern(Method):
    """A drafter whose acceptance is LanternRule."""

    def __init__(self, k: int = 1000, delta: float = 0.1, lam: Optional[float] = None, drafter: str = "sd", **drafter_options):
        if drafter not in ("sd", "sjd"):
            raise ArexportError(f"lantern drafter must be sd or sjd, got {drafter!r}")
        self.k, self.delta, self.lam, self.drafter = k, delta, lam, drafter
        self.drafter_options = drafter_options
        self.needs_draft = drafter == "sd"
        # validate drafter options now, so bad ones fail before any work
        (SD if drafter == "sd" else SJD)(**drafter_options)

    def generate(self, engine, conds, params, rng, progress=None, draft=None):
        rule = LanternRule(engine.neighbors(self.k), k=self.k, delta=self.delta, lam=self.lam)
        inner = (SD if self.drafter == "sd" else SJD)(rule=rule, **self.drafter_options)
        return inner.generate(engine, conds, params, rng, progress=progress, draft=draft)
