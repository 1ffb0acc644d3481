"""A trained model's own dataset splits, rebuilt from its config, and batches of their images.

Evaluation, the sample commands and the benchmarks read the images a bundle was trained and
tested on through these two functions, so that a subset drawn with a seed is the same subset
everywhere and an unreadable image is skipped the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from scatgen.data import build_dataset, collate_skip_none
from scatgen.utils import progress_bar

if TYPE_CHECKING:
    from scatgen.pipeline import Pipeline

__all__ = ["iterate_images", "load_split"]


def load_split(pipe: Pipeline, split: str, limit: int = 0, seed: int = 0, data_root: str | None = None) -> Dataset:
    """The bundle's dataset split; a seeded random subset of `limit` images if limit > 0."""
    data_cfg = pipe.cfg.data
    if data_root:
        data_cfg = replace(data_cfg, root=data_root)
    dataset = build_dataset(data_cfg, split)
    if 0 < limit < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
        dataset = Subset(dataset, sorted(order.tolist()))
    return dataset


def iterate_images(dataset: Dataset, batch_size: int, desc: str = "", progress: bool = False) -> Iterator[torch.Tensor]:
    """The readable images of `dataset` in order, as batches (B, 3, N, N); unreadable ones are left out."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_skip_none)
    for batch in progress_bar(loader, desc=desc, disable=not progress, leave=False):
        if batch is not None:
            yield batch
