"""ONNX Runtime backend: loader.py (sessions from an engine directory), runner.py (IOBinding steps)."""
