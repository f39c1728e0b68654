"""Serving: an embeddable batching service over the runtime, and the `arexport serve` HTTP server."""

from arexport.serving.service import GenerationService, Response, ServiceClosed

__all__ = ["GenerationService", "Response", "ServiceClosed"]
