"""Deployment on serving systems users already run: Ray Serve (ray_serve.py) and NVIDIA Triton
Inference Server (triton.py writes a model repository). Both run GenerationService / Session, the
public runtime and serving APIs; requests are the plain dicts of requests.py."""
