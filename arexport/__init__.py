"""arexport: step-function export and fast decoding runtimes for visual autoregressive generators."""

__version__ = "0.1.0"

from arexport.errors import ArexportError  # noqa: E402

__all__ = ["ArexportError", "__version__"]
