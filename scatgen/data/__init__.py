"""Datasets: polygons (procedural), CelebA and image folders → images (3, N, N) in [-1, 1].

`dataset[i]` is a float32 tensor (3, N, N) with values in [-1, 1], or None for an
unreadable file (after a CorruptImageWarning naming it); an index out of range
raises IndexError. `collate_skip_none` drops the Nones from a batch.
Every dataset has `identity()` (a JSON-able dict of everything that determines
its images, for cache keys) and `path(i)` (the file, or None for polygons).
`load_image` reads a user's file with the same preprocessing. `build_dataset` with a
cache_dir reads images from the uint8 cache of `scatgen.data.cache` (built on first use).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset, default_collate

from scatgen.data.cache import CachedImages, cache_images
from scatgen.data.celeba import CelebADataset, default_crop
from scatgen.data.folder import ImageFolderDataset
from scatgen.data.images import IMAGE_EXTENSIONS, CorruptImageWarning, FileImageDataset, load_image
from scatgen.data.polygons import PolygonDataset

SPLITS = ("train", "test")


def build_dataset(cfg, split: str, cache_dir: str | Path | None = None, num_workers: int = 0,
                  progress: bool = True) -> Dataset:
    """The `split` ("train" or "test") of the dataset that `cfg` (a DataConfig) describes.

    num_train / num_test cap the split's length (first n); 0 = all for celeba/folder.
    With a `cache_dir` and cfg.cache_images, the images come from the uint8 image cache there,
    built on first use by one pass with `num_workers` DataLoader workers.
    """
    dataset = _open_dataset(cfg, split)
    if cache_dir is None or not cfg.cache_images:
        return dataset
    return cache_images(dataset, cache_dir, num_workers, progress)


def _open_dataset(cfg, split: str) -> Dataset:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    limit = cfg.num_train if split == "train" else cfg.num_test
    if cfg.name == "polygons":
        return PolygonDataset(split, cfg.image_size, cfg.seed, limit)
    if cfg.name == "celeba":
        return CelebADataset(cfg.root, split, cfg.image_size, cfg.crop, limit)
    if cfg.name == "folder":
        return ImageFolderDataset(cfg.root, split, cfg.image_size, cfg.crop, cfg.seed, cfg.test_fraction, limit,
                                  split_mode=cfg.split)
    raise ValueError(f"data.name must be one of polygons, celeba, folder, got {cfg.name!r}")


def effective_crop(cfg) -> int:
    """The crop a dataset built from `cfg` uses (pass it to load_image to match): celeba's default when 0."""
    if cfg.name == "celeba" and not cfg.crop:
        return default_crop(cfg.image_size)
    return int(cfg.crop)


def collate_skip_none(batch: list):
    """DataLoader collate_fn: default_collate over the items that are not None (nor tuples holding a None).

    Items are tensors or tuples of tensors / ints; returns None when nothing is left.
    """
    kept = [b for b in batch if b is not None and not (isinstance(b, tuple) and any(x is None for x in b))]
    return default_collate(kept) if kept else None


from scatgen.data.splits import iterate_images, load_split  # noqa: E402  (last: splits uses build_dataset)

__all__ = ["IMAGE_EXTENSIONS", "SPLITS", "CachedImages", "CelebADataset", "CorruptImageWarning", "FileImageDataset",
           "ImageFolderDataset", "PolygonDataset", "build_dataset", "cache_images", "collate_skip_none", "default_crop",
           "effective_crop", "iterate_images", "load_image", "load_split"]
