"""Decoding loops over a StepEngine; importing this package registers the built-in methods."""

from arexport.runtime.decoding.base import METHODS, DecodeResult, Method, make_method
from arexport.runtime.decoding import ar, arpg, gridar, lantern, sd, sjd, vvs  # noqa: F401

__all__ = ["METHODS", "DecodeResult", "Method", "make_method"]
