"""Calibration and quantization: capture step inputs, build INT8 / FP8 / INT4-weight Q/DQ engines,
and gate them on accuracy before writing."""
