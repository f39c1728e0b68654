"""Runtime: StepEngine backends, KV cache, sampling, decoding loops and the Generator API.

A production service needs only this package and a backend: it never imports the exporter.
"""

from arexport.runtime.engine import Conditions, StepEngine
from arexport.runtime.generator import GenerationResult, Generator
from arexport.runtime.sampling import SamplingParams

__all__ = ["Conditions", "GenerationResult", "Generator", "SamplingParams", "StepEngine"]
