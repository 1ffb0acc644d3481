"""Datasets: polygons (procedural), CelebA and image folders → images (3, N, N) in [-1, 1].

`dataset[i]` is a float32 tensor, or None for an unreadable file (after a
CorruptImageWarning naming it); `collate_skip_none` drops those from a batch.
"""

from __future__ import annotations

from torch.utils.data import Dataset, default_collate

from scatgen.data.celeba import CelebADataset, default_crop
from scatgen.data.folder import ImageFolderDataset
from scatgen.data.images import CorruptImageWarning, load_image
from scatgen.data.polygons import PolygonDataset

SPLITS = ("train", "test")


def build_dataset(cfg, split: str) -> Dataset:
    """The `split` of the dataset that `cfg` (a DataConfig) describes."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    limit = cfg.num_train if split == "train" else cfg.num_test
    if cfg.name == "polygons":
        return PolygonDataset(split, cfg.image_size, cfg.seed, limit)
    if cfg.name == "celeba":
        return CelebADataset(cfg.root, split, cfg.image_size, cfg.crop, limit)
    if cfg.name == "folder":
        return ImageFolderDataset(cfg.root, split, cfg.image_size, cfg.crop, cfg.seed, cfg.test_fraction, limit)
    raise ValueError(f"data.name must be polygons, celeba or folder, got {cfg.name!r}")


def collate_skip_none(batch: list):
    """default_collate over the items that are not None (nor tuples holding None); None if none are left."""
    kept = [b for b in batch if b is not None and not (isinstance(b, tuple) and any(x is None for x in b))]
    return default_collate(kept) if kept else None


__all__ = ["CelebADataset", "CorruptImageWarning", "ImageFolderDataset", "PolygonDataset", "build_dataset",
           "collate_skip_none", "default_crop", "load_image"]
