"""Training batches: (code, image) pairs, and the batches of each global step.

The step order is a pure function of (seed, step), so a resumed run sees the same data as
an uninterrupted one without restoring any sampler state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from scatgen.data.cache import CachedImages

if TYPE_CHECKING:
    from scatgen.codes import CodeSet


class CodedImages(Dataset):
    """Item j → (codes[j], image of dataset item indices[j]), or None if that file became unreadable."""

    def __init__(self, dataset: Dataset, codeset: CodeSet) -> None:
        self.dataset, self.codeset = dataset, codeset

    def __len__(self) -> int:
        return len(self.codeset.codes)

    def __getitem__(self, j: int):
        image = self.dataset[int(self.codeset.indices[j])]
        return None if image is None else (self.codeset.codes[j], image)

    def __getitems__(self, js: list[int]) -> list:
        """The DataLoader's batched read: one fancy index of the image cache instead of B item reads."""
        if not isinstance(self.dataset, CachedImages):
            return [self[j] for j in js]
        images, readable = self.dataset.images(self.codeset.indices[js])
        return list(zip(self.codeset.codes[js][readable], images))


class StepBatches(torch.utils.data.Sampler):
    """The batches of global steps [start, stop) for one rank."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int, world: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self.steps_per_epoch = n // (batch_size * world)
        if self.steps_per_epoch == 0:
            raise ValueError(f"train.batch_size={batch_size} × {world} process(es) exceeds the {n} train images; "
                             f"lower train.batch_size")

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        epoch, perm = -1, None
        for step in range(self.start, self.stop):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            first = (step % self.steps_per_epoch) * self.batch_size * self.world + self.rank * self.batch_size
            yield perm[first:first + self.batch_size].tolist()


def first_readable(codeset: CodeSet, dataset: Dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, images) of the first n items of `codeset` whose image is still readable: the fixed
    test batch of the periodic evaluation and of the final pictures."""
    codes, images = [], []
    for j in range(len(codeset.codes)):
        if len(images) == n:
            break
        image = dataset[int(codeset.indices[j])]
        if image is not None:
            codes.append(codeset.codes[j])
            images.append(image)
    return torch.stack(codes), torch.stack(images)
