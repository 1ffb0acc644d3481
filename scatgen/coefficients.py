"""images → S_J coefficients, streamed: the batches that the whitening fit and the code cache
read, and a temporary spill file that lets later passes read the coefficients back instead of
scattering every image again."""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from scatgen.config import Config
from scatgen.data import collate_skip_none
from scatgen.scattering import Scattering
from scatgen.utils import LOCKS_SUPPORTED, lock_file, progress_bar, rank_world


class IndexedImages(Dataset):
    """dataset[i] → (image, i), or None where the image is unreadable."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image = self.dataset[i]
        return None if image is None else (image, i)


def image_loader(dataset: Dataset, batch_size: int, num_workers: int, shard: bool) -> DataLoader:
    rank, world = rank_world()
    indexed = IndexedImages(dataset)
    if shard and world > 1:
        indexed = Subset(indexed, range(rank, len(dataset), world))
    return DataLoader(indexed, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_skip_none)


@torch.no_grad()
def scatter_batches(scattering: Scattering, loader: DataLoader, device: torch.device,
                    desc: str, progress: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (coeffs (B, D), dataset indices (B,)) per batch of readable images."""
    for batch in progress_bar(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        if batch is None:
            continue
        images, indices = batch
        coeffs = scattering(images.to(device, non_blocking=True))
        yield coeffs.reshape(coeffs.shape[0], -1).cpu(), indices


class CoeffSpill:
    """One pass of scattering coeffs kept in a temporary disk file, so that later passes of the
    whitening fit, and the train encoding, read them back instead of scattering again.

    RAM stays O(batch); the disk holds n·D float32 values until `close()`.
    """

    def __init__(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        remove_stale_spills(directory)
        fd, self.path = tempfile.mkstemp(prefix=".spill-", suffix=".f32", dir=directory)
        self.file = os.fdopen(fd, "w+b")
        lock_file(fd)  # marks the file as in use; see remove_stale_spills
        self.indices: list[torch.Tensor] = []
        self.complete = False

    def write_through(self, stream: Iterator[tuple[torch.Tensor, torch.Tensor]]):
        # A pass abandoned early (the fit peeks at one batch for its shift) starts over.
        self.file.seek(0)
        self.file.truncate()
        self.indices = []
        for coeffs, indices in stream:
            self.file.write(coeffs.numpy().astype(np.float32, copy=False).tobytes())
            self.indices.append(indices)
            yield coeffs, indices
        self.file.flush()
        self.complete = True

    def read(self, dim: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.file.seek(0)
        for indices in self.indices:
            values = np.fromfile(self.file, dtype=np.float32, count=len(indices) * dim)
            yield torch.from_numpy(values).reshape(len(indices), dim), indices

    def close(self) -> None:
        self.file.close()
        Path(self.path).unlink(missing_ok=True)


def remove_stale_spills(directory: str | Path) -> None:
    """Delete spill files left by killed runs. A live run holds a lock on its spill file, and the
    kernel drops that lock when the process dies, so a spill we can lock is nobody's."""
    if not LOCKS_SUPPORTED:  # Windows: a live spill could not be told from a stale one
        return
    for path in Path(directory).glob(".spill-*.f32"):
        try:
            with open(path, "rb") as f:
                if not lock_file(f.fileno(), wait=False):
                    continue
                size = path.stat().st_size
                path.unlink()
        except FileNotFoundError:
            continue
        warnings.warn(f"removed {path.name} ({size / 1e9:.2f} GB), a scattering spill left by a killed run")


def spill_fits(cfg: Config, scattering: Scattering, num_images: int) -> bool:
    dim = math.prod(scattering.out_shape)
    return cfg.whitening.max_images == 0 and num_images * dim * 4 <= cfg.whitening.spill_gb * 1e9
