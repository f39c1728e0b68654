"""Atomic file and directory writes: a reader never sees a half-written file or directory."""

from __future__ import annotations

import io
import json
import os
import re
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
def atomic_directory(final: str | os.PathLike, overwrite: bool = False, report=None) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on success rename it to `final`, on error delete it.

    With overwrite, an existing `final` is replaced only after the new one is complete. The temp
    directory's name carries this process's pid: directories left by builds whose process is gone
    (kill -9, a crash) are removed when the next build starts in the same parent. SIGTERM during the
    build (main thread) removes the partial directory and exits with status 143.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (use --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_builds(final.parent):
        if report is not None:
            report(f"removed {stale} left by an interrupted build")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building.{os.getpid()}.", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    previous = _raise_on_sigterm()
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.{os.getpid()}.", dir=final.parent))
            os.replace(final, old / "x")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _restore_sigterm(previous)


_TEMP_NAME = re.compile(r"^\..+\.(building|old)\.(\d+)\.[^.]+$")


def remove_stale_builds(parent: str | os.PathLike) -> list[Path]:
    """Delete `.NAME.building.PID.*` / `.NAME.old.PID.*` directories in parent whose process is gone."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if not m or not entry.is_dir() or _alive(int(m.group(2))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _raise_on_sigterm():
    """In the main thread: make SIGTERM raise SystemExit(143) so cleanup runs; returns the old handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous) -> None:
    import signal
    import threading

    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


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
