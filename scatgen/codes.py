"""The on-disk code cache: the encoder's codes of each split, computed once per key.

A cache entry is keyed by everything that determines its numbers: the dataset's
identity (name, root, split, size, crop, seed, file list), J, L, d and the fitted
whitening's fingerprint. Entries are written atomically, so a killed run never
leaves one that loads as valid. Only codes are stored, never the scattering coeffs.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from scatgen.coefficients import CoeffSpill, image_loader, scatter_batches, spill_fits
from scatgen.config import Config
from scatgen.data import build_dataset
from scatgen.encoder import Encoder, build_scattering, fit_encoder
from scatgen.integrity import CorruptFileError, tensors_sha256
from scatgen.utils import atomic_path, cache_key, rank_world

CACHE_VERSION = 2  # 2: entries carry a checksum


@dataclass
class CodeSet:
    """Codes of one split: codes[i] belongs to dataset item indices[i] (unreadable files are absent)."""

    codes: torch.Tensor  # (n, d) float32
    indices: torch.Tensor  # (n,) int64
    num_skipped: int = 0


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
def encode_split(cfg: Config, split: str, encoder: Encoder, progress: bool = True,
                 spill: CoeffSpill | None = None) -> CodeSet:
    """Codes of one split, from the cache or computed (sharded across ranks) and stored.

    A complete `spill` of this split's coeffs is read instead of scattering again."""
    dataset = build_dataset(cfg.data, split, cfg.run.cache_dir, cfg.train.num_workers, progress)
    key_parts = dict(version=CACHE_VERSION, dataset=dataset.identity(), J=cfg.encoder.J, L=cfg.encoder.L,
                     d=encoder.d, whitening=encoder.whitening.fingerprint())
    path = Path(cfg.run.cache_dir) / f"codes-{split}-{cache_key(key_parts)}.safetensors"
    cached = load_codes(path)
    if cached is not None:
        return cached
    all_codes, all_indices = [], []
    loader = image_loader(dataset, cfg.encoder.batch_size, cfg.train.num_workers, shard=True)
    if spill is not None and spill.complete:
        stream = spill.read(math.prod(encoder.scattering.out_shape))
    else:
        stream = scatter_batches(encoder.scattering, loader, encoder.device, f"encoding {split}", progress)
    for coeffs, indices in stream:
        all_codes.append(encoder.whitening(coeffs.to(encoder.device)).cpu())
        all_indices.append(indices)
    codes = torch.cat(all_codes) if all_codes else torch.empty(0, encoder.d)
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
                  progress: bool = True) -> tuple[Encoder, dict[str, CodeSet]]:
    """The fitted encoder and the codes of both splits: (encoder, {'train': ..., 'test': ...})."""
    scattering = build_scattering(cfg).to(device)
    num_train = len(build_dataset(cfg.data, "train"))
    spill = CoeffSpill(cfg.run.cache_dir) if spill_fits(cfg, scattering, num_train) else None
    try:
        encoder = fit_encoder(cfg, device, progress, spill, scattering)
        splits = {s: encode_split(cfg, s, encoder, progress, spill if s == "train" else None)
                  for s in ("train", "test")}
    finally:
        if spill is not None:
            spill.close()
    return encoder, splits
