"""The on-disk image cache: every item decoded, cropped and resized once, then kept as uint8.

An entry is a folder ``images-{split}-{key}/`` under the cache dir, keyed like the code cache
by the dataset's identity() and the image shape. ``images.u8`` is the raw (n, 3, N, N) uint8
array, read through a memory map; ``header.json`` holds the format version, identity, shape,
the unreadable items and a sha256 of the array's bytes. Unreadable items are zero rows that
read back as None, without the warning their build already gave.

Writes: the folder is built under a temporary sibling name, fsynced and renamed into place, so a
killed build never leaves an entry that opens. A build holds ``images-{split}-{key}.lock``
(flock), which makes the temporary folders of killed builds of that entry safe to delete.

Reads: the checksum is verified the first time a process opens an entry (2 GB of CelebA at 64²
takes seconds, so later opens of an unchanged file skip it); a mismatch, a short file or a bad
header gives a warning naming the file and a rebuild. A value v reads back as the float32 that
`to_tensor` makes of it, through a 256-entry table taken from `to_tensor` itself, and the build
checks that every item round-trips, so cached items are bit-identical to the dataset's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from scatgen.data.images import _normalize_index, to_tensor
from scatgen.integrity import file_sha256
from scatgen.utils import LOCKS_SUPPORTED, atomic_path, cache_key, lock_file, progress_bar, rank_world

__all__ = ["FORMAT_VERSION", "CachedImages", "cache_images"]

FORMAT_VERSION = 1
DATA, HEADER = "images.u8", "header.json"


def _uint8_to_float() -> np.ndarray:
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # a 1×256 RGB image
    return to_tensor(Image.fromarray(ramp, "RGB"))[0, 0].numpy().copy()


TO_FLOAT = _uint8_to_float()  # (256,) float32: what to_tensor makes of each uint8 value

# Entries whose checksum this process has verified, with the file stats it saw then.
_verified: dict[str, tuple] = {}


class CachedImages(Dataset):
    """`dataset` read from its cache entry: the same len, items (or None), identity() and path(i).

    `images(indices)` reads a whole batch with one fancy index of the memory map.
    """

    def __init__(self, dataset: Dataset, entry: Path, shape: tuple[int, int, int, int],
                 unreadable: Sequence[int]) -> None:
        self.dataset, self.entry, self.shape = dataset, Path(entry), tuple(shape)
        self.readable = np.ones(self.shape[0], dtype=bool)
        self.readable[list(unreadable)] = False
        self._array: np.memmap | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def identity(self) -> dict:
        return self.dataset.identity()

    def path(self, i: int):
        return self.dataset.path(i)

    def array(self) -> np.memmap:
        """The (n, 3, N, N) uint8 memory map, opened on first use in each process."""
        if self._array is None:
            self._array = np.memmap(self.entry / DATA, dtype=np.uint8, mode="r", shape=self.shape)
        return self._array

    def __getstate__(self) -> dict:
        # DataLoader workers map the file themselves instead of receiving a pickled copy of it.
        return {**self.__dict__, "_array": None}

    def __getitem__(self, i: int) -> torch.Tensor | None:
        i = _normalize_index(i, len(self))
        if not self.readable[i]:
            return None
        return torch.from_numpy(np.take(TO_FLOAT, self.array()[i]))

    def images(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Items `indices` (B,) → (the readable ones' images (K, 3, N, N) float32, readable (B,) bool)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise IndexError(f"index {bad} out of range for a dataset of {n} images")
        idx = np.where(idx < 0, idx + n, idx)
        readable = self.readable[idx]
        rows = self.array()[idx[readable]]
        return torch.from_numpy(np.take(TO_FLOAT, rows)), torch.from_numpy(readable)

    def __repr__(self) -> str:
        return f"CachedImages({self.dataset!r}, entry={str(self.entry)!r})"


class _Uint8Items(Dataset):
    """dataset[i] → (i, its uint8 array (3, N, N)) or (i, None), checking that the array reads back exactly."""

    def __init__(self, dataset: Dataset, shape: tuple[int, int, int]) -> None:
        self.dataset, self.shape = dataset, shape

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None]:
        image = self.dataset[i]
        if image is None:
            return i, None
        name = type(self.dataset).__name__
        if not isinstance(image, torch.Tensor) or image.dtype != torch.float32 or tuple(image.shape) != self.shape:
            raise TypeError(f"{name} item {i} is {_describe(image)}, but the image cache stores float32 tensors "
                            f"{self.shape}; set data.cache_images=false")
        x = image.numpy()
        values = np.clip(np.rint((x + 1) * 127.5), 0, 255).astype(np.uint8) if np.isfinite(x).all() else None
        if values is None or not np.array_equal(np.take(TO_FLOAT, values), x):
            raise ValueError(f"{name} item {i} is not made of the levels v / 127.5 - 1 (v = 0..255) that the "
                             f"image cache stores exactly; set data.cache_images=false")
        return i, values


def _describe(image) -> str:
    if isinstance(image, torch.Tensor):
        return f"a {image.dtype} tensor of shape {tuple(image.shape)}"
    return f"a {type(image).__name__}"


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _stats(entry: Path) -> tuple:
    return tuple((s.st_size, s.st_mtime_ns, s.st_ino) for s in ((entry / DATA).stat(), (entry / HEADER).stat()))


def _check_entry(entry: Path, identity: dict, shape: tuple, verify: bool) -> tuple[dict | None, str]:
    """(header, "") for a valid entry, else (None, what is wrong; "" when it is simply absent)."""
    if not entry.is_dir():
        return None, ""
    try:
        header = json.loads((entry / HEADER).read_text())
        size = (entry / DATA).stat().st_size
    except (OSError, ValueError) as e:
        return None, f"image cache entry '{entry}' is unreadable ({type(e).__name__}: {e})"
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        return None, f"image cache entry '{entry}' has an unknown format"
    if header.get("shape") != list(shape) or _json(header.get("identity")) != _json(identity):
        return None, f"image cache entry '{entry}' belongs to another dataset"
    unreadable = header.get("unreadable")
    if not isinstance(unreadable, list) or not all(isinstance(i, int) and 0 <= i < shape[0] for i in unreadable):
        return None, f"image cache entry '{entry}' has a malformed header"
    if size != math.prod(shape):
        return None, f"image cache file '{entry / DATA}' holds {size} bytes, expected {math.prod(shape)} (truncated)"
    if verify and _verified.get(str(entry)) != _stats(entry):
        if file_sha256(entry / DATA) != header.get("sha256"):
            return None, f"image cache file '{entry / DATA}' does not match its checksum (corrupt)"
        _verified[str(entry)] = _stats(entry)
    return header, ""


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive flock on `path` (created if needed); yields whether locking is available."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        lock_file(f.fileno())  # released when the file closes; without flock (Windows) stale temp folders stay
        yield LOCKS_SUPPORTED


def _write_entry(dataset: Dataset, entry: Path, identity: dict, shape: tuple, num_workers: int,
                 progress: bool) -> dict:
    n, row_bytes = shape[0], math.prod(shape[1:])
    loader = DataLoader(_Uint8Items(dataset, shape[1:]), batch_size=64, num_workers=num_workers, collate_fn=list)
    digest, unreadable, blank = hashlib.sha256(), [], bytes(row_bytes)
    with atomic_path(entry) as tmp:
        tmp.mkdir()
        with open(tmp / DATA, "wb") as f:
            bar = progress_bar(total=n, desc=f"caching {identity.get('split', '')} images", unit="image",
                               disable=not progress, leave=False)
            written = 0
            for batch in loader:
                for i, values in batch:
                    assert i == written, "the build loader must yield the items in order"
                    row = blank if values is None else values.tobytes()
                    if values is None:
                        unreadable.append(i)
                    f.write(row)
                    digest.update(row)
                    written += 1
                bar.update(len(batch))
            bar.close()
            f.flush()
            os.fsync(f.fileno())
        header = dict(format=FORMAT_VERSION, identity=identity, shape=list(shape), dtype="uint8",
                      unreadable=unreadable, sha256=digest.hexdigest())
        with open(tmp / HEADER, "w") as f:
            f.write(json.dumps(header, default=str))
            f.flush()
            os.fsync(f.fileno())
    _verified[str(entry)] = _stats(entry)
    return json.loads((entry / HEADER).read_text())


def cache_images(dataset: Dataset, cache_dir: str | Path, num_workers: int = 0,
                 progress: bool = True) -> Dataset:
    """`dataset` read from its uint8 entry under `cache_dir`, built by one pass on first use.

    With torch.distributed initialised, rank 0 verifies or builds the entry while the other ranks
    wait at a barrier; then every rank opens it. An empty dataset is returned as it is.
    """
    if isinstance(dataset, CachedImages) or len(dataset) == 0:
        return dataset
    size = getattr(dataset, "image_size", None)
    if not isinstance(size, int):
        raise TypeError(f"cache_images needs a dataset with an int image_size, got {type(dataset).__name__}; "
                        f"set data.cache_images=false")
    identity = dataset.identity()
    shape = (len(dataset), 3, size, size)
    key = cache_key(dict(version=FORMAT_VERSION, dataset=identity, shape=shape))
    entry = Path(cache_dir) / f"images-{identity.get('split', 'all')}-{key}"
    rank, world = rank_world()
    if rank == 0:
        header, problem = _check_entry(entry, identity, shape, verify=True)
        if header is None:
            with _build_lock(entry.with_name(entry.name + ".lock")) as locked:
                header, _ = _check_entry(entry, identity, shape, verify=True)  # built while we waited?
                if header is None:
                    if problem:
                        warnings.warn(f"{problem}; rebuilding it", stacklevel=2)
                    if locked:  # no other build of this entry runs: its temporary folders are stale
                        for stale in entry.parent.glob(f".tmp-{entry.name}-*"):
                            shutil.rmtree(stale, ignore_errors=True)
                    header = _write_entry(dataset, entry, identity, shape, num_workers, progress)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        header, problem = _check_entry(entry, identity, shape, verify=False)  # rank 0 has just verified it
        if header is None:
            raise FileNotFoundError(f"rank {rank} cannot open the image cache entry '{entry}' that rank 0 built "
                                    f"({problem or 'absent'}); run.cache_dir must be a folder every process can read")
    return CachedImages(dataset, entry, shape, header["unreadable"])
