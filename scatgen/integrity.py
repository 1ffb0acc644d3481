"""Checksums for everything scatgen writes and later trusts: cache entries, checkpoints, bundles.

A folder (checkpoint, bundle) carries `checksums.json`, {relative path: sha256} of every
other file in it, written last; a single file (a cache entry) carries the digest of its
tensors in its own metadata. A mismatch is never used: callers recompute (caches), fall
back to an older copy (checkpoints) or refuse with the file's name (bundles).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from scatgen.utils import atomic_path

MANIFEST = "checksums.json"


class CorruptFileError(ValueError):
    """A file's bytes differ from the checksum recorded when it was written."""


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Digest of named tensors' names, dtypes, shapes and bytes, independent of dict order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_manifest(folder: str | Path) -> Path:
    """Record the sha256 of every file under `folder` (except the manifest) in checksums.json."""
    folder = Path(folder)
    sums = {p.relative_to(folder).as_posix(): file_sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    path = folder / MANIFEST
    path.write_text(json.dumps(sums, indent=1))
    return path


def verify_manifest(folder: str | Path) -> None:
    """Raise CorruptFileError naming the first file that is missing or differs from checksums.json
    (or when checksums.json itself is missing: the folder was not completely written)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CorruptFileError(f"'{folder}' has no {MANIFEST}: it was not completely written")
    try:
        sums = json.loads(path.read_text())
        if not isinstance(sums, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise CorruptFileError(f"'{path}' is corrupt (not a JSON mapping of file checksums)") from None
    for name, digest in sums.items():
        file = folder / name
        if not file.is_file():
            raise CorruptFileError(f"'{file}' is missing (listed in {path})")
        if file_sha256(file) != digest:
            raise CorruptFileError(f"'{file}' is corrupt: its checksum differs from the one recorded in {path}")


def update_manifest(folder: str | Path, relpath: str) -> None:
    """Add or refresh one file's checksum in an existing manifest (e.g. a prior added to a bundle)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CorruptFileError(f"'{folder}' has no {MANIFEST}: it was not completely written")
    sums = json.loads(path.read_text())
    sums[relpath] = file_sha256(folder / relpath)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(sums, indent=1))
