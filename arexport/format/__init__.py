"""The engine directory format: model spec, typed manifest, files and hashes, TensorRT profiles.

This package is the leaf every other layer agrees on. It imports neither the PyTorch models, the
exporter nor the runtime (an import-linter contract in pyproject.toml enforces it), so a serving
process reads an engine directory without loading any model code.
"""

from arexport.format.manifest import FORMAT, FORMAT_VERSION, FileEntry, Graph, Manifest, Profiles, read_manifest, verify_files
from arexport.format.spec import ImageSpec, ModelSpec, s_max_for

__all__ = ["FORMAT", "FORMAT_VERSION", "FileEntry", "Graph", "ImageSpec", "Manifest", "ModelSpec", "Profiles",
           "read_manifest", "s_max_for", "verify_files"]
