"""PyTorch backend: loader.py (the reference model from a name or an engine's recorded source), runner.py."""

from arexport.runtime.backends.torch.loader import open_directory, open_draft_head, open_model

__all__ = ["open_directory", "open_draft_head", "open_model"]
