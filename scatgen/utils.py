"""Small helpers shared across stages."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

LOCKS_SUPPORTED = fcntl is not None


def lock_file(fd: int, wait: bool = True) -> bool:
    """Take an exclusive advisory lock on an open file; the kernel drops it when the file is closed
    or its process dies (even by SIGKILL). False only when `wait` is False and another open file
    holds it; True, without locking, where the platform has no flock (see LOCKS_SUPPORTED)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; move it into place only if the block succeeds.

    A killed process leaves at worst a stray `.tmp-*` file, never a half-written `path`.
    Works for files and for directories.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # the caller creates a file or a directory there
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def cache_key(parts: dict[str, Any]) -> str:
    """16 hex digits naming a cache entry by everything that determines its content."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def one_line_warnings() -> None:
    """Show warnings as `warning: message` lines: a command's user needs the message, not the
    source line that raised it."""
    import warnings

    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"warning: {message}\n"


def describe_os_error(e: OSError, options: str = "run.out_dir / run.cache_dir") -> str:
    """One line for a failed file operation: what, where, and what to do about it (`options`
    names the settings that choose the paths, e.g. '--out / --cache-dir' for a command)."""
    where = f" '{e.filename}'" if e.filename else ""
    hint = {errno.ENOSPC: f"free some disk space, or point {options} at another disk",
            errno.EDQUOT: f"free some disk space, or point {options} at another disk",
            errno.EACCES: f"choose a writable {options}",
            errno.EPERM: f"choose a writable {options}",
            errno.EROFS: f"choose a {options} on a writable file system",
            errno.ENOTDIR: f"a part of the path is a regular file; choose another {options}",
            errno.EEXIST: f"a file is in the way of a folder; choose another {options}",
            errno.EISDIR: f"a folder is in the way of a file; choose another {options}",
            }.get(e.errno, "check the path and the disk")
    return f"{e.strerror or e}{where}: {hint}"


def writable_folder(path: str | Path) -> Path:
    """Create `path` if needed and prove that files can be written in it, before any work; an
    OSError (to be shown with describe_os_error) names the path otherwise."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)  # a file in the way is a FileExistsError (EEXIST)
    # os.access is not enough: it says yes to root on a read-only mount, and to ACL-denied users.
    try:
        fd, probe = tempfile.mkstemp(prefix=".tmp-write-test-", dir=path)
    except OSError as e:  # name the folder, not the probe file
        raise type(e)(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    os.unlink(probe)
    return path


def short_repr(value: Any, limit: int = 80) -> str:
    """repr(value) cut to about `limit` characters, without building the whole of a huge value
    (a YAML alias bomb expands to billions of items)."""
    import reprlib

    shortener = reprlib.Repr()
    shortener.maxlevel, shortener.maxstring, shortener.maxother = 3, limit, limit
    shortener.maxlist = shortener.maxtuple = shortener.maxdict = shortener.maxset = 6
    text = shortener.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """tqdm that redraws every 30 s instead of 0.1 s when stderr is a log file, not a terminal,
    so that `train.py > log` stays readable."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(iterable, **kwargs)
