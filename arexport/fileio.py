"""Atomic file and directory writes: a reader never sees a half-written file or directory."""

from __future__ import annotations

import io
import json
import os
import re
import secrets
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



def atomic_write_png(path: str | os.PathLike, fig, dpi: int = 110) -> None:
    """A matplotlib figure rendered to PNG and written atomically (atomic_write_bytes); the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())

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


OUTPUT_DIR_FORMATS = ("arexport-engine", "arexport-calibration")  # manifest.json "format" of directories we write
MARKER = ".arexport-temp"  # inside every temp directory this module makes: "arexport temp <token>\n"


@contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False, report=None,
                     replace_any: bool = False) -> Iterator[Path]:
    """Yield a new directory (inside a temp directory beside `final`); on success rename it to `final`,
    on error delete it.

    With overwrite, an existing `final` is replaced only after the new one is complete, and only
    when it is one this program writes (its manifest.json names an arexport format) or empty;
    `replace_any` lifts that check. One writer per `final` at a time: a lock file beside it
    (`.NAME.arexport-lock`) makes a concurrent second writer fail at once instead of replacing the
    first one's result. Temp directories are named `.NAME.building.PID.TOKEN` / `.NAME.old.PID.TOKEN`
    (TOKEN: 32 random hex digits) and hold a marker file repeating TOKEN, written before anything
    else: the cleanup of leftovers from dead processes (kill -9, a crash), run when the next build
    starts in the same parent, deletes only directories with both. SIGTERM during the build (main
    thread) removes the partial directory and exits with status 143.
    """
    from arexport.errors import ArexportError

    final = _checked_target(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_builds(final.parent):
        if report is not None:
            report(f"removed {stale} left by an interrupted build")
    previous = _raise_on_sigterm()
    try:
        with _output_lock(final):
            if final.exists() or final.is_symlink():
                if not overwrite:
                    raise FileExistsError(f"{final} already exists (use --overwrite to replace it)")
                _check_replaceable(final, replace_any)
            tmp = _marked_temp_dir(final, "building")  # holds the marker and, as `out`, the new directory
            try:
                out = tmp / "out"
                os.mkdir(out)
                os.chmod(out, 0o777 & ~_umask())
                yield out
                if final.exists() or final.is_symlink():
                    if not overwrite:  # created meanwhile by something that does not take our lock
                        raise ArexportError(f"{final} appeared while building; left the new build unused")
                    old = _marked_temp_dir(final, "old")
                    os.replace(final, old / "x")
                    os.replace(out, final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(out, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        _restore_sigterm(previous)


def check_output_dir(final: str | os.PathLike, overwrite: bool, replace_any: bool = False, flag: str = "--out") -> None:
    """The checks atomic_directory makes before it starts, for a CLI to run before long work."""
    from arexport.errors import ArexportError

    p = _checked_target(final)
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise ArexportError(f"{flag} {final} already exists (use --overwrite to replace it)")
        _check_replaceable(p, replace_any)
    check_writable(p, "dir", what=flag)


def _checked_target(final: str | os.PathLike) -> Path:
    """`final` as a Path; refuses ".", "..", a filesystem root and the current directory or its ancestors
    (replacing them would pull the ground from under the process)."""
    from arexport.errors import ArexportError

    p = Path(final)
    resolved = p.resolve()
    cwd = Path.cwd().resolve()
    if p.name in ("", ".", "..") or resolved == resolved.parent or resolved == cwd or resolved in cwd.parents:
        raise ArexportError(f"output directory {str(final)!r} is the current directory, one above it or a root; "
                            "give a new directory path such as engines/NAME")
    return p


def _check_replaceable(final: Path, replace_any: bool) -> None:
    from arexport.errors import ArexportError

    if final.is_symlink() or not final.is_dir():
        raise ArexportError(f"{final} exists and is not a directory; refusing to replace it")
    if replace_any or not any(final.iterdir()):
        return
    try:
        fmt = json.loads((final / "manifest.json").read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt not in OUTPUT_DIR_FORMATS:
        raise ArexportError(f"{final} is not an arexport engine or calibration directory (no arexport manifest.json); "
                            "--overwrite replaces only those: move it away, or pass --overwrite-any-directory to replace it")


def _marked_temp_dir(final: Path, kind: str) -> Path:
    """A new `.NAME.KIND.PID.TOKEN` directory beside final holding the marker file (see atomic_directory)."""
    token = secrets.token_hex(16)
    tmp = final.parent / f".{final.name}.{kind}.{os.getpid()}.{token}"
    os.mkdir(tmp, 0o700)  # exclusive: never an existing directory; private until it is renamed away
    (tmp / MARKER).write_text(f"arexport temp {token}\n", encoding="ascii")
    return tmp


_TEMP_NAME = re.compile(r"^\..+\.(building|old)\.(\d+)\.([0-9a-f]{32})$")
_LOCK_SUFFIX = ".arexport-lock"


@contextmanager
def _output_lock(final: Path) -> Iterator[None]:
    """An exclusive, non-blocking flock on `.NAME.arexport-lock` beside final; removed on release."""
    import fcntl

    from arexport.errors import ArexportError

    path = final.parent / f".{final.name}{_LOCK_SUFFIX}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArexportError(f"another arexport process is writing {final} (lock {path} is held); "
                                "wait for it or choose another output directory") from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file between our open and our lock: it was writing final
            raise ArexportError(f"another arexport process was writing {final} just now; retry")
        os.ftruncate(fd, 0)
        os.write(fd, f"arexport lock {os.getpid()}\n".encode())
        try:
            yield
        finally:
            try:
                os.unlink(path)  # while still holding the lock: a waiter's inode check sees it went
            except FileNotFoundError:
                pass
    finally:
        os.close(fd)


def remove_stale_builds(parent: str | os.PathLike) -> list[Path]:
    """Delete temp directories atomic_directory left in `parent` whose process is gone: only real
    directories named `.NAME.building|old.PID.TOKEN` holding the marker file with that TOKEN, so no
    directory this program did not make can match. Unheld lock files with our content go too."""
    import fcntl

    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry.name.endswith(_LOCK_SUFFIX) and entry.name.startswith(".") and entry.is_file() and not entry.is_symlink():
            try:
                fd = os.open(entry, os.O_RDWR | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: a live writer; skip
                content = os.pread(fd, 64, 0)
                m = re.fullmatch(rb"arexport lock (\d+)\n", content)
                if m and not _alive(int(m.group(1))) and os.stat(entry).st_ino == os.fstat(fd).st_ino:
                    os.unlink(entry)
            except OSError:
                pass
            finally:
                os.close(fd)
            continue
        m = _TEMP_NAME.match(entry.name)
        if not m or entry.is_symlink() or not entry.is_dir() or _alive(int(m.group(2))):
            continue
        try:
            marker = (entry / MARKER).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            continue
        if marker != f"arexport temp {m.group(3)}\n":
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
