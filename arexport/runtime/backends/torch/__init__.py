"""PyTorch backend: loader.py (the reference model from a name or an engine's recorded source), runner.py."""
