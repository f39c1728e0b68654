"""Backends behind the StepEngine interface: torch (eager), ort (ONNX Runtime), trt (TensorRT)."""
