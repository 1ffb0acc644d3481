"""image → S_J → L → code: the encoder, z = Λ^{-1/2} Uᵀ (S_J x − μ).

An `Encoder` owns the two stages: the fixed scattering transform (built on first use, since
sampling without refinement never needs its filters) and the whitening fitted on the train
split. Everything that turns images into codes, or needs the coefficients a code stands for
(refinement), goes through it. `fit_encoder` fits the whitening, streaming the train split's
coefficients, and keeps the result in the cache folder under a key of everything it depends on.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import Subset

from scatgen.coefficients import CoeffSpill, image_loader, scatter_batches
from scatgen.config import Config
from scatgen.data import build_dataset
from scatgen.scattering import Scattering
from scatgen.utils import cache_key, rank_world
from scatgen.whitening import Whitening, fit_whitening

WHITENING_CACHE_VERSION = 2  # 2: entries carry a checksum


class Encoder:
    """images (B, 3, N, N) in [-1, 1] → codes (B, d)."""

    def __init__(self, cfg: Config, whitening: Whitening, scattering: Scattering | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.whitening = whitening.to(self.device)
        self._scattering = None if scattering is None else scattering.to(self.device)

    @property
    def d(self) -> int:
        return self.whitening.d

    @property
    def scattering(self) -> Scattering:
        if self._scattering is None:  # built on first use, on the encoder's device
            self._scattering = build_scattering(self.cfg).to(self.device)
        return self._scattering

    def coefficients(self, images: torch.Tensor) -> torch.Tensor:
        """S_J x flattened: (B, 3, N, N) → (B, D), on the encoder's device."""
        coeffs = self.scattering(images.to(self.device))
        return coeffs.reshape(len(coeffs), -1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """codes (B, d) on the CPU, `batch_size` images at a time."""
        if len(images) == 0:
            return torch.empty(0, self.d)
        return torch.cat([self.whitening(self.coefficients(chunk)).cpu() for chunk in images.split(batch_size)])


def build_scattering(cfg: Config) -> Scattering:
    e = cfg.encoder
    return Scattering(e.J, cfg.data.image_size, e.L, e.backend, cache_dir=cfg.run.cache_dir, compile=e.compile)


def fit_encoder(cfg: Config, device: torch.device | str = "cpu", progress: bool = True,
                spill: CoeffSpill | None = None, scattering: Scattering | None = None) -> Encoder:
    """The encoder for cfg, with its whitening from the cache or fitted on the train split (streamed).

    With a `spill`, the first pass stores the coeffs on disk and the later passes read them."""
    device = torch.device(device)
    scattering = (scattering or build_scattering(cfg)).to(device)
    return Encoder(cfg, _fit_or_load_whitening(cfg, scattering, device, progress, spill), scattering, device)


def _fit_or_load_whitening(cfg: Config, scattering: Scattering, device: torch.device, progress: bool,
                           spill: CoeffSpill | None) -> Whitening:
    train = build_dataset(cfg.data, "train", cfg.run.cache_dir, cfg.train.num_workers, progress)
    w = cfg.whitening
    if w.max_images and w.max_images < len(train):
        train = Subset(train, range(w.max_images))
        identity = dict(build_dataset(cfg.data, "train").identity(), max_images=w.max_images)
    else:
        identity = train.identity()
    key_parts = dict(version=WHITENING_CACHE_VERSION, dataset=identity, J=cfg.encoder.J, L=cfg.encoder.L, d=w.d,
                     method=w.method, oversample=w.oversample, power_iters=w.power_iters, eps=w.eps,
                     seed=cfg.run.seed)
    path = Path(cfg.run.cache_dir) / f"whitening-{cache_key(key_parts)}.safetensors"
    if path.is_file():
        try:
            return Whitening.load(path)
        except ValueError as e:
            warnings.warn(f"ignoring a corrupt whitening cache entry: {e}")
    loader = image_loader(train, cfg.encoder.batch_size, cfg.train.num_workers, shard=True)
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
