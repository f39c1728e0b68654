"""manifest.json of an engine directory: what is in it, and the checks that refuse a bad one.

The runtime refuses a directory whose manifest it does not understand (wrong format, newer
version, missing fields), whose files are missing or whose hashes/sizes do not match, or whose
TensorRT plans were built for another GPU or TensorRT version — each with a message naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from arexport.errors import ManifestError
from arexport.models.checkpoint import file_sha256
from arexport.spec import ModelSpec

FORMAT = "arexport-engine"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED = ("format", "format_version", "spec", "precision", "graphs", "files", "profiles", "tools")


def tool_versions() -> dict[str, Optional[str]]:
    """Versions of the tools that made (or run) an engine; None where not installed."""
    from importlib import metadata

    out: dict[str, Optional[str]] = {}
    for dist in ("arexport", "torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "tensorrt", "polygraphy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def file_entry(path: Path) -> dict[str, Any]:
    """{'bytes': size, 'sha256': hex} of a file."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Record every file of `directory` (size, sha256) in manifest["files"], then write manifest.json atomically."""
    from arexport.fileio import atomic_write_json

    manifest["files"] = {p.name: file_entry(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    atomic_write_json(directory / MANIFEST, manifest)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Load and validate manifest.json structure (not file hashes); raises ManifestError."""
    d = Path(directory)
    if not d.is_dir():
        raise ManifestError(f"engine directory not found: {d}")
    p = d / MANIFEST
    if not p.exists():
        raise ManifestError(f"{d} is not an engine directory: no {MANIFEST}")
    try:
        m = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(m, dict):
        raise ManifestError(f"{p} must hold a JSON object")
    if m.get("format") != FORMAT:
        raise ManifestError(f"{p}: unknown format {m.get('format')!r} (expected {FORMAT!r})")
    v = m.get("format_version")
    if not isinstance(v, int):
        raise ManifestError(f"{p}: format_version missing or not an integer")
    if v > FORMAT_VERSION:
        raise ManifestError(
            f"{p}: manifest format version {v} is newer than this arexport understands ({FORMAT_VERSION}); upgrade arexport"
        )
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise ManifestError(f"{p}: missing fields: {', '.join(missing)}")
    try:
        ModelSpec.from_json(m["spec"])
    except (KeyError, TypeError) as e:
        raise ManifestError(f"{p}: malformed model spec ({e})") from None
    for name, g in m["graphs"].items():
        if "file" not in g or g["file"] not in m["files"]:
            raise ManifestError(f"{p}: graph {name} names a file that the manifest does not list")
    return m


def verify_files(directory: str | Path, manifest: dict[str, Any], check_hashes: bool = True) -> None:
    """Every listed file exists with the recorded size (and sha256); raises ManifestError naming it."""
    d = Path(directory)
    for name, entry in manifest["files"].items():
        f = d / name
        if not f.exists():
            raise ManifestError(f"{d}: file {name} listed in the manifest is missing")
        size = f.stat().st_size
        if size != entry.get("bytes"):
            raise ManifestError(f"{d}: file {name} has {size} bytes, the manifest says {entry.get('bytes')} (truncated or replaced)")
        if check_hashes and file_sha256(f) != entry.get("sha256"):
            raise ManifestError(f"{d}: file {name} does not match its sha256 in the manifest (corrupt or modified)")


def spec_of(manifest: dict[str, Any]) -> ModelSpec:
    return ModelSpec.from_json(manifest["spec"])
