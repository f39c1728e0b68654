"""Runtime: backends (loader + runner), KV cache, sampling, step-wise decoding methods, the scheduler and
the Generator API.

A production service needs only this package, the engine-directory format and a backend: it never
imports the exporter or the PyTorch model definitions (the torch backend's loader is the one
exception, and only when the torch backend is asked for).
"""

from arexport.families import Conditions
from arexport.runtime.engine import StepEngine
from arexport.runtime.generator import GenerationResult, Generator
from arexport.runtime.methods.base import method_names
from arexport.runtime.multi_device import RowSplitEngine, check_devices, open_row_split, split_generator
from arexport.runtime.sampling import SamplingParams
from arexport.runtime.session import Image, Session, decode_finished

__all__ = ["Conditions", "GenerationResult", "Generator", "Image", "RowSplitEngine", "SamplingParams", "Session",
           "StepEngine", "check_devices", "decode_finished", "method_names", "open_row_split",
           "split_generator"]
