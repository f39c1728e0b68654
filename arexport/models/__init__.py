"""PyTorch reference models: LlamaGen (c2i, t2i), VQ-16 decoder, the digits demo."""

from arexport.models.llamagen import LlamaGen, LlamaGenConfig
from arexport.models.registry import LoadedModel, canonical_name, known_models, load_model, model_config

__all__ = ["LlamaGen", "LlamaGenConfig", "LoadedModel", "canonical_name", "known_models", "load_model", "model_config"]
