"""Decoding loops over a StepEngine; importing this package registers the built-in methods."""

from arexport.runtime.decoding.base import METHODS, DecodeResult, Method, make_method
from arexport.runtime.decoding import ar, lantern, sd, sjd  # noqa: F401

__all__ = ["METHODS", "DecodeResult", "Method", "make_method"]
