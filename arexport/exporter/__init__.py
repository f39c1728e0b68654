"""Exporter: step functions with static KV caches -> ONNX graphs, graph checks, engine directories and TensorRT plans."""
