"""The on-disk code cache: images → S_J → whitening → codes, computed once per key.

A cache entry is keyed by everything that determines its numbers: the dataset's
identity (name, root, split, size, crop, seed, file list), J, L, d and the fitted
whitening's fingerprint. Entries are written atomically, so a killed run never
leaves one that loads as valid. Only codes are stored, never the scattering coeffs.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Subset

from scatgen.config import Config
from scatgen.data import build_dataset, collate_skip_none
from scatgen.integrity import CorruptFileError, tensors_sha256
from scatgen.scattering import Scattering
from scatgen.utils import LOCKS_SUPPORTED, atomic_path, cache_key, lock_file, progress_bar, rank_world
from scatgen.whitening import Whitening, fit_whitening
CACHE_VERSION = 2  # 2: entries carry a checksum


@dataclass
class CodeSet:
    """Codes of one split: codes[i] belongs to dataset item indices[i] (unreadable files are absent)."""

    codes: torch.Tensor  # (n, d) float32
    indices: torch.Tensor  # (n,) int64
    num_skipped: int = 0


class IndexedImages(Dataset):
    """dataset[i] → (image, i), or None where the image is unreadable."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image = self.dataset[i]
        return None if image is None else (image, i)


def _loader(dataset: Dataset, batch_size: int, num_workers: int, shard: bool) -> DataLoader:
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


def _spill_fits(cfg: Config, scattering: Scattering, num_images: int) -> bool:
    dim = math.prod(scattering.out_shape)
    return cfg.whitening.max_images == 0 and num_images * dim * 4 <= cfg.whitening.spill_gb * 1e9


def fit_or_load_whitening(cfg: Config, scattering: Scattering, device: torch.device, progress: bool = True,
                          spill: CoeffSpill | None = None) -> Whitening:
    """The whitening for cfg, from the cache or fitted on the train split (streamed).

    With a `spill`, the first pass stores the coeffs on disk and the later passes read them."""
    train = build_dataset(cfg.data, "train", cfg.run.cache_dir, cfg.train.num_workers, progress)
    w = cfg.whitening
    if w.max_images and w.max_images < len(train):
        train = Subset(train, range(w.max_images))
        identity = dict(build_dataset(cfg.data, "train").identity(), max_images=w.max_images)
    else:
        identity = train.identity()
    key_parts = dict(version=CACHE_VERSION, dataset=identity, J=cfg.encoder.J, L=cfg.encoder.L, d=w.d,
                     method=w.method, oversample=w.oversample, power_iters=w.power_iters, eps=w.eps,
                     seed=cfg.run.seed)
    path = Path(cfg.run.cache_dir) / f"whitening-{cache_key(key_parts)}.safetensors"
    if path.is_file():
        try:
            return Whitening.load(path)
        except ValueError as e:
            warnings.warn(f"ignoring a corrupt whitening cache entry: {e}")
    loader = _loader(train, cfg.encoder.batch_size, cfg.train.num_workers, shard=True)

    dim = math.prod(scattering.out_shape)

    def batches() -> Iterator[torch.Tensor]:
        if spill is not None and spill.complete:
            stream = spill.read(dim)
        else:
            stream = scatter_batches(scattering, loader, device, "scattering", progress)
            if spill is not None:
                stream = spill.write_through(stream)
        for coeffs, _ in stream:
            yield coeffs

    meta = dict(J=cfg.encoder.J, L=cfg.encoder.L, image_size=cfg.data.image_size, dataset=identity)
    whitening = fit_whitening(batches, d=w.d, method=w.method, oversample=w.oversample,
                              power_iters=w.power_iters, eps=w.eps, seed=cfg.run.seed,
                              progress=progress, metadata=meta)
    if rank_world()[0] == 0:
        whitening.save(path)
    return whitening


def _gather(codes: torch.Tensor, indices: torch.Tensor, skipped: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    rank, world = rank_world()
    if world == 1:
        return codes, indices, skipped
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, (codes, indices, skipped))
    codes = torch.cat([p[0] for p in parts])
    indices = torch.cat([p[1] for p in parts])
    order = torch.argsort(indices)
    return codes[order], indices[order], sum(p[2] for p in parts)


@torch.no_grad()
def encode_split(cfg: Config, split: str, scattering: Scattering, whitening: Whitening,
                 device: torch.device, progress: bool = True, spill: CoeffSpill | None = None) -> CodeSet:
    """Codes of one split, from the cache or computed (sharded across ranks) and stored.

    A complete `spill` of this split's coeffs is read instead of scattering again."""
    dataset = build_dataset(cfg.data, split, cfg.run.cache_dir, cfg.train.num_workers, progress)
    key_parts = dict(version=CACHE_VERSION, dataset=dataset.identity(), J=cfg.encoder.J, L=cfg.encoder.L,
                     d=whitening.d, whitening=whitening.fingerprint())
    path = Path(cfg.run.cache_dir) / f"codes-{split}-{cache_key(key_parts)}.safetensors"
    cached = load_codes(path)
    if cached is not None:
        return cached
    whitening = whitening.to(device)
    all_codes, all_indices = [], []
    loader = _loader(dataset, cfg.encoder.batch_size, cfg.train.num_workers, shard=True)
    if spill is not None and spill.complete:
        stream = spill.read(math.prod(scattering.out_shape))
    else:
        stream = scatter_batches(scattering, loader, device, f"encoding {split}", progress)
    for coeffs, indices in stream:
        all_codes.append(whitening(coeffs.to(device)).cpu())
        all_indices.append(indices)
    codes = torch.cat(all_codes) if all_codes else torch.empty(0, whitening.d)
    indices = torch.cat(all_indices) if all_indices else torch.empty(0, dtype=torch.long)
    skipped = len(loader.dataset) - len(indices)
    codes, indices, skipped = _gather(codes, indices, skipped)
    if len(codes) == 0:
        raise ValueError(f"no readable images in the {split} split of {dataset.identity()}")
    if skipped:
        warnings.warn(f"{skipped} unreadable image(s) skipped in the {split} split")
    if rank_world()[0] == 0:
        meta = dict(key_parts, split=split, num_skipped=skipped)
        with atomic_path(path) as tmp:
            tensors = {"codes": codes.contiguous(), "indices": indices.contiguous()}
            meta["sha256"] = tensors_sha256(tensors)
            save_file(tensors, str(tmp), metadata={"scatgen_codes": json.dumps(meta, default=str)})
    return CodeSet(codes, indices, skipped)


def load_codes(path: Path) -> CodeSet | None:
    """A cached CodeSet, or None when absent or unreadable (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["scatgen_codes"])
            codes, indices = f.get_tensor("codes"), f.get_tensor("indices")
        if meta.get("sha256") != tensors_sha256({"codes": codes, "indices": indices}):
            raise CorruptFileError("its checksum differs from the one stored with it")
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        warnings.warn(f"ignoring a corrupt code cache entry '{path}' ({e}); recomputing")
        return None
    return CodeSet(codes, indices, int(meta.get("num_skipped", 0)))


def prepare_codes(cfg: Config, device: torch.device | str = "cpu",
                  progress: bool = True) -> tuple[Scattering, Whitening, dict[str, CodeSet]]:
    """The encoder half of scatgen: (scattering, whitening, {'train': ..., 'test': ...})."""
    device = torch.device(device)
    scattering = Scattering(cfg.encoder.J, cfg.data.image_size, cfg.encoder.L, cfg.encoder.backend,
                            cache_dir=cfg.run.cache_dir, compile=cfg.encoder.compile).to(device)
    num_train = len(build_dataset(cfg.data, "train"))
    spill = CoeffSpill(cfg.run.cache_dir) if _spill_fits(cfg, scattering, num_train) else None
    try:
        whitening = fit_or_load_whitening(cfg, scattering, device, progress, spill)
        splits = {s: encode_split(cfg, s, scattering, whitening, device, progress, spill if s == "train" else None)
                  for s in ("train", "test")}
    finally:
        if spill is not None:
            spill.close()
    return scattering, whitening.cpu(), splits
