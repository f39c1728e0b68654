"""Decoding methods as step-wise decoders; importing this package registers the built-in ones."""

from arexport.runtime.methods.base import METHODS, Decoder, Finished, Method, Row, RowStats, make_method
from arexport.runtime.methods import ar, arpg, gridar, gsd, lantern, lpd, nar, par, randar, sd, sjd, var, vvs, zipar  # noqa: F401
from arexport.runtime.methods import eagle  # noqa: F401,E402  (tree speculative decoding with a draft head)

__all__ = ["METHODS", "Decoder", "Finished", "Method", "Row", "RowStats", "make_method"]
