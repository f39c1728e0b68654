"""manifest.json of an engine directory as a typed dataclass, and the checks that refuse a bad one.

The runtime refuses a directory whose manifest it does not understand (wrong format, other
version, missing fields), whose files are missing or whose hashes/sizes do not match, or whose
TensorRT plans were built for another GPU or TensorRT version — each with a message naming it.

Format versions: 3 (this one) names the step kind each step graph implements (`Graph.step`, see
format.stepkinds), so a directory may hold several (a second step kind's graph next to `step`); version-2
directories are read too (their step graphs' kinds follow from their names and labels). Version 2
sized every graph's cache with `lookahead` slots past the image (`spec.s_max = s_max_for(cond_len,
n_tokens, verify_len - 1)`), which lets one batch step rows with different query lengths. Version-1
directories lack that headroom and are refused with a message that says to rebuild them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from arexport.errors import ManifestError
from arexport.format.spec import ModelSpec
from arexport.format.stepkinds import StepKind, graph_step_kind

FORMAT = "arexport-engine"
FORMAT_VERSION = 3
OLDEST_READ = 2  # version 2 lacks Graph.step only, which format.stepkinds infers
MANIFEST = "manifest.json"
REQUIRED = ("format", "format_version", "spec", "precision", "graphs", "files", "profiles", "tools")
PRECISIONS = ("fp32", "fp16", "bf16")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


@dataclass
class FileEntry:
    """Size and sha256 of one file of the directory."""

    bytes: int
    sha256: str


@dataclass
class Graph:
    """One ONNX graph of the directory: its file, I/O signature and (step graphs) its step kinds."""

    file: str
    inputs: list[dict] = field(default_factory=list)  # [{'name', 'dtype', 'shape'}]
    outputs: list[dict] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)  # call label (decode, verify, ...) -> largest query length
    step: Optional[str] = None  # the step kind it implements (format.stepkinds); None: no cache (decoders)
    q_range: Optional[list[int]] = None
    aliases: dict[str, str] = field(default_factory=dict)  # present_* -> past_* (in-place cache outputs)
    export_seconds: Optional[float] = None


@dataclass
class Profiles:
    """Shapes the engine serves: batch sizes in rows (CFG doubles them) and the largest query length
    (`verify_len`: the same number as `Manifest.max_q`)."""

    batch_sizes: list[int]
    verify_len: int
    step_kinds: dict[str, int] = field(default_factory=dict)


@dataclass
class Manifest:
    """Everything an engine directory holds and where it came from (manifest.json)."""

    spec: ModelSpec
    precision: str
    graphs: dict[str, Graph]
    profiles: Profiles
    files: dict[str, FileEntry] = field(default_factory=dict)
    tools: dict[str, Optional[str]] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # how the weights were obtained (rebuilds the torch reference)
    arrays: dict[str, str] = field(default_factory=dict)  # codebook / neighbors / null caption .npy files
    weights: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)  # graph checks and operator histograms
    created: str = ""
    build_seconds: Optional[float] = None
    tensorrt: Optional[dict[str, Any]] = None
    quantization: Optional[dict[str, Any]] = None
    export: dict[str, Any] = field(default_factory=dict)  # how the graphs were traced (fused_ops)
    draft_head: Optional[dict[str, Any]] = None  # an EAGLE head built into the directory (exporter/head.py)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def step(self) -> Graph:
        return self.graphs["step"]

    @property
    def max_q(self) -> int:
        """The largest query length of any step: `--verify-len` at build, recorded as profiles.verify_len
        and as each step graph's q_range[1] (checked equal on reading), StepEngine.max_q at run time."""
        return int(self.profiles.verify_len)

    def step_graphs(self) -> dict[str, "StepKind"]:
        """Graph name -> the step kind it implements, for every step graph of the directory."""
        out = {}
        for name, g in self.graphs.items():
            kind = graph_step_kind(name, g)
            if kind is not None:
                out[name] = kind
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the manifest.json document)."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_json(cls, m: dict[str, Any], where: str = MANIFEST) -> "Manifest":
        """Validate a manifest.json document and type it; raises ManifestError naming the problem."""
        if not isinstance(m, dict):
            raise ManifestError(f"{where} must hold a JSON object")
        if m.get("format") != FORMAT:
            raise ManifestError(f"{where}: unknown format {m.get('format')!r} (expected {FORMAT!r})")
        v = m.get("format_version")
        if not isinstance(v, int):
            raise ManifestError(f"{where}: format_version missing or not an integer")
        if v > FORMAT_VERSION:
            raise ManifestError(f"{where}: manifest format version {v} is newer than this arexport understands "
                                f"({FORMAT_VERSION}); upgrade arexport")
        if v < OLDEST_READ:
            raise ManifestError(f"{where}: manifest format version {v} was written by an older arexport (this one reads "
                                f"{OLDEST_READ}-{FORMAT_VERSION}: caches now carry lookahead slots); rebuild the engine with arexport build")
        missing = [k for k in REQUIRED if k not in m]
        if missing:
            raise ManifestError(f"{where}: missing fields: {', '.join(missing)}")
        try:
            spec = ModelSpec.from_json(m["spec"])
        except (KeyError, TypeError) as e:
            raise ManifestError(f"{where}: malformed model spec ({e})") from None
        if m["precision"] not in PRECISIONS:
            raise ManifestError(f"{where}: unknown precision {m['precision']!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            files = {k: FileEntry(**e) for k, e in m["files"].items()}
            graphs = {k: Graph(**g) for k, g in m["graphs"].items()}
            profiles = Profiles(**m["profiles"])
            rest = {k: v for k, v in m.items() if k in known and k not in ("spec", "files", "graphs", "profiles")}
            out = cls(spec=spec, files=files, graphs=graphs, profiles=profiles, **rest)
        except (TypeError, AttributeError) as e:
            raise ManifestError(f"{where}: malformed manifest ({e})") from None
        for name in files:  # every file an engine reads is named here: plain names keep it inside its directory
            if not isinstance(name, str) or not _plain_name(name):
                raise ManifestError(f"{where}: file name {name!r} is not a plain file name inside the engine directory")
        for name, file in (m.get("arrays") or {}).items():
            if file not in files:
                raise ManifestError(f"{where}: array {name} names a file that the manifest does not list")
        head = out.draft_head
        if head is not None and not (isinstance(head, dict) and all(head.get(k) in files for k in ("graph", "weights"))):
            raise ManifestError(f"{where}: draft_head must name its graph and weights files, both listed in files")
        if isinstance(out.weights, dict) and out.weights.get("file") is not None and out.weights["file"] not in files:
            raise ManifestError(f"{where}: the weights file is not listed in the manifest")
        top = 4 * (spec.cond_len + spec.n_tokens) + 64  # the cache holds condition, image and a verify block
        if not isinstance(spec.s_max, int) or not spec.cond_len + spec.n_tokens <= spec.s_max <= top:
            raise ManifestError(f"{where}: cache length s_max {spec.s_max!r} is implausible for {spec.cond_len} condition "
                                f"+ {spec.n_tokens} image tokens (expected up to {top})")
        if "step" not in graphs:
            raise ManifestError(f"{where}: no step graph")
        for name, g in graphs.items():
            if g.file not in files:
                raise ManifestError(f"{where}: graph {name} names a file that the manifest does not list")
            if g.q_range is not None and int(g.q_range[1]) != out.max_q:
                raise ManifestError(f"{where}: graph {name} serves queries up to {g.q_range[1]}, the profiles say "
                                    f"{out.max_q} (one number: the engine's largest query length)")
        return out


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


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


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Record every file of `directory` (size, sha256) in manifest.files, then write manifest.json atomically."""
    from arexport.fileio import atomic_write_json

    manifest.files = {p.name: FileEntry(p.stat().st_size, file_sha256(p))
                      for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name != MANIFEST}
    atomic_write_json(Path(directory) / MANIFEST, manifest.to_json())


def read_manifest(directory: str | Path) -> Manifest:
    """Load and validate manifest.json (not the file hashes: see verify_files); raises ManifestError."""
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
    return Manifest.from_json(m, where=str(p))


def verify_files(directory: str | Path, manifest: Manifest, check_hashes: bool = True) -> None:
    """Every listed file exists with the recorded size (and sha256); raises ManifestError naming it."""
    d = Path(directory)
    for name, entry in manifest.files.items():
        f = d / name
        if not f.exists():
            raise ManifestError(f"{d}: file {name} listed in the manifest is missing")
        size = f.stat().st_size
        if size != entry.bytes:
            raise ManifestError(f"{d}: file {name} has {size} bytes, the manifest says {entry.bytes} (truncated or replaced)")
        if check_hashes and file_sha256(f) != entry.sha256:
            raise ManifestError(f"{d}: file {name} does not match its sha256 in the manifest (corrupt or modified)")
