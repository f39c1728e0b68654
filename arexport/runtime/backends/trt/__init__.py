"""TensorRT backend: loader.py (plans, compatibility checks), runner.py (execute_async_v3, CUDA graphs)."""
