"""Atomic file and directory writes: a reader never sees a half-written file or directory."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: str | os.PathLike, kind: str = "file", what: str = "output") -> None:
    """Raise ArexportError naming `path` when it cannot be written as a `kind` ("file" or "dir"):
    an existing entry of the other kind, an ancestor that is a file, or no write permission on the
    nearest existing ancestor. Called before long work, so a bad path costs nothing."""
    from arexport.errors import ArexportError

    p = Path(path)
    if p.exists():
        if kind == "file" and p.is_dir():
            raise ArexportError(f"{what} {path} is a directory, expected a file path")
        if kind == "dir" and not p.is_dir():
            raise ArexportError(f"{what} {path} exists and is not a directory")
        target = p if kind == "dir" else p.parent
    else:
        target = p.parent
    while not target.exists():
        target = target.parent
    if not target.is_dir():
        raise ArexportError(f"{what} {path} cannot be created: {target} is a file, not a directory")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ArexportError(f"{what} {path} cannot be written: no write permission on {target}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write data to a temp file beside path, fsync, then rename over path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON (indented, sorted keys) written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """np.save to exactly `path` (no .npy appended), atomically."""
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """uint8 [H,W,3] or [H,W] -> PNG, atomically."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


@contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on success rename it to `final`, on error delete it.

    With overwrite, an existing `final` is replaced only after the new one is complete.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (use --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building.", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
            os.replace(final, old / "x")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
