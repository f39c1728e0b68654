"""Model family adapters, by name. Registering a family: one adapter module plus one line here."""

from __future__ import annotations

from arexport.errors import ArexportError
from arexport.families.arpg import ARPGFamily
from arexport.families.base import Conditions, Family
from arexport.families.emu3 import Emu3Family, LuminaMGPTFamily
from arexport.families.janus import JanusFamily
from arexport.families.llamagen import LlamaGenFamily
from arexport.families.lpd import LPDFamily
from arexport.families.nar import NARFamily
from arexport.families.par import PARFamily
from arexport.families.randar import RandARFamily
from arexport.families.rar import RARFamily
from arexport.families.var import VARFamily

FAMILIES: dict[str, Family] = {f.name: f for f in (LlamaGenFamily(), ARPGFamily(), RARFamily(), VARFamily(), JanusFamily(),
                                             Emu3Family(), LuminaMGPTFamily(), PARFamily(), RandARFamily(), LPDFamily(),
                                             NARFamily())}


def get_family(name: str) -> Family:
    """The adapter of a family (as recorded in ModelSpec.family)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ArexportError(f"unknown model family {name!r}; this arexport knows {', '.join(FAMILIES)}") from None


__all__ = ["Conditions", "FAMILIES", "Family", "get_family"]
