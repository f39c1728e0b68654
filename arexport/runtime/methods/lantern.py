"""`lantern`: LANTERN relaxed acceptance on top of a drafter (`sd` by default, `eagle` when a draft head
is given: the official setup, `--tree static` being LANTERN++'s `--static_tree`; or `sjd`).

Neighbourhoods come from L2 distances between the raw codebook rows, as LANTERN's
`generate_codebook.py` computes them (precomputed into the engine directory at build time, or
computed once from the decoder's codebook on the torch backend). `rule=official` (default) is the
official acceptance, residual and greedy variant; `rule=capped` bounds the total variation by delta
(see `arexport.runtime.speculative.LanternRule`). delta = 0 reproduces the drafter exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from arexport.errors import ArexportError
from arexport.runtime.methods.base import Method, Options, option, register
from arexport.runtime.methods.eagle import Eagle, EagleDrafting, EagleOptions
from arexport.runtime.methods.sd import SD, SDOptions
from arexport.runtime.methods.sjd import SJD, SJDOptions
from arexport.runtime.speculative import LANTERN_RULES, LanternRule, check_lantern

DRAFTERS = {"sd": SD, "sjd": SJD, "eagle": Eagle}


@dataclass(frozen=True)
class LanternOptions(EagleDrafting, Options):
    k: int = option(1000, "nearest codebook neighbours searched", flag="--lantern-k")
    delta: float = option(0.1, "total-variation budget delta", flag="--lantern-delta")
    lam: Optional[float] = option(None, "LANTERN++ bound: pooled mass <= (lambda - 1) p(x)", flag="--lantern-lambda")
    drafter: Optional[str] = option(None, "drafter under the relaxed acceptance (default: eagle when --draft-head is "
                                    "given, the official setup; else sd)", flag="--drafter", choices=tuple(DRAFTERS))
    rule: str = option("official", "official: LANTERN's evaluate_posterior_v1 (uncapped credit, q zeroed at k+1 "
                       "neighbours, greedy variant); "
                       "capped: credit <= delta q(x), output within TV delta of the target", choices=LANTERN_RULES)
    gamma: Optional[int] = None  # sd drafter (its default)
    window: Optional[int] = None  # sjd drafter (its default)
    init: str = SJDOptions.__dataclass_fields__["init"].default
    start: int = 0
    end: Optional[int] = None
    draft_head: Optional[str] = None  # eagle drafter (its options; --tree static is LANTERN++'s --static_tree)
    tree: str = EagleOptions.__dataclass_fields__["tree"].default
    top_k: int = EagleOptions.__dataclass_fields__["top_k"].default
    depth: int = EagleOptions.__dataclass_fields__["depth"].default
    tokens: Optional[int] = None
    choices: Optional[str] = None

    def validate(self):
        check_lantern(self.k, self.delta, self.lam, self.rule)
        self.drafter_options().validate()
        return self

    def drafter_options(self) -> Options:
        if self.drafter_name == "eagle":
            return self.eagle_options()
        if self.draft_head:
            raise ArexportError(f"--draft-head is read by the eagle drafter; lantern --drafter {self.drafter} does not use it")
        if self.drafter_name == "sd":
            return SDOptions(gamma=self.gamma)
        return SJDOptions(window=self.window, init=self.init, start=self.start, end=self.end)


@register("lantern")
class Lantern(Method):
    """A drafter whose acceptance is LanternRule."""

    Options = LanternOptions
    help = "LANTERN relaxed acceptance (latent-space neighbours, TV budget) on top of sd or sjd"

    def requires_draft(self) -> bool:
        return self.options.drafter_name == "sd"

    def decoder(self, ctx, capacity):
        o = self.options
        rule = LanternRule(ctx.engine.neighbors(o.k + 1), k=o.k, delta=o.delta, lam=o.lam, rule=o.rule,
                           greedy=ctx.params.greedy)
        drafter = DRAFTERS[o.drafter_name](o.drafter_options())
        return drafter.decoder(type(ctx)(ctx.engine, ctx.params, o.drafter_options(), ctx.draft), capacity, rule=rule)
