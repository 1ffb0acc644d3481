"""The user-facing model: image ⇄ code through S_J, the whitening and the generator.

    pipe = scatgen.load("runs/polygons")
    codes = pipe.encode(images)              # (B, 3, N, N) in [-1, 1] → (B, d)
    recons = pipe.decode(codes)              # (B, d) → (B, 3, N, N)
    samples = pipe.sample(16, seed=0)        # z ~ N(0, T² I)
    path = pipe.interpolate(za, zb, steps=8) # (steps, 3, N, N)
"""

from __future__ import annotations

from pathlib import Path

import torch

from scatgen.config import Config
from scatgen.generators import Generator
from scatgen.scattering import Scattering
from scatgen.whitening import Whitening


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1 − t) a + t b for codes a, b (d,) and weights t (K,) → (K, d)."""
    return (1 - t)[:, None] * a + t[:, None] * b


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation: keeps the norm that Gaussian codes concentrate on. (K, d)."""
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    if omega.abs() < 1e-6:
        return lerp(a, b, t)
    return (torch.sin((1 - t) * omega)[:, None] * a + torch.sin(t * omega)[:, None] * b) / torch.sin(omega)


class Pipeline:
    """Encoder (fixed scattering + whitening) and generator, on one device."""

    def __init__(self, generator: Generator, whitening: Whitening, cfg: Config,
                 scattering: Scattering | None = None, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.cfg = cfg
        self.generator = generator.to(self.device).eval()
        self.whitening = whitening.to(self.device)
        self._scattering = scattering

    @property
    def image_size(self) -> int:
        return self.cfg.data.image_size

    @property
    def d(self) -> int:
        return self.whitening.d

    @property
    def scattering(self) -> Scattering:
        # Built on first use: sampling alone never needs the filters.
        if self._scattering is None:
            e = self.cfg.encoder
            self._scattering = Scattering(e.J, self.image_size, e.L, e.backend, cache_dir=self.cfg.run.cache_dir)
        return self._scattering.to(self.device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """images (B, 3, N, N) in [-1, 1] → codes (B, d) = L (S_J x − μ)."""
        n = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, n, n):
            raise ValueError(f"expected images of shape (B, 3, {n}, {n}), got {tuple(images.shape)}")
        out = [self.whitening(self.scattering(chunk.to(self.device))) for chunk in images.split(batch_size)]
        return torch.cat(out).cpu()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """codes (B, d) → images (B, 3, N, N) in [-1, 1]."""
        if codes.ndim != 2 or codes.shape[1] != self.d:
            raise ValueError(f"expected codes of shape (B, {self.d}), got {tuple(codes.shape)}")
        self.generator.eval()
        out = [self.generator(chunk.to(self.device))[0].float() for chunk in codes.split(batch_size)]
        return torch.cat(out).cpu()

    def random_codes(self, n: int, seed: int = 0, temperature: float = 1.0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return temperature * torch.randn(n, self.d, generator=generator)

    def sample(self, n: int, seed: int = 0, temperature: float = 1.0) -> torch.Tensor:
        """n images decoded from z ~ N(0, temperature² I)."""
        return self.decode(self.random_codes(n, seed, temperature))

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """G(L S_J x)."""
        return self.decode(self.encode(images))

    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int = 8, spherical: bool = False) -> torch.Tensor:
        """Decode `steps` codes from a to b (each (d,), or an image (3, N, N) to encode first)."""
        if steps < 2:
            raise ValueError(f"interpolation needs at least 2 steps, got {steps}")
        a, b = (self.encode(v[None])[0] if v.ndim == 3 else v for v in (a, b))
        t = torch.linspace(0, 1, steps)
        return self.decode((slerp if spherical else lerp)(a.float(), b.float(), t))


def load(path: str | Path, device: torch.device | str = "cpu") -> Pipeline:
    """A Pipeline from a bundle directory or a run directory."""
    from scatgen.bundle import load_bundle

    generator, whitening, cfg = load_bundle(path, device=device)
    return Pipeline(generator, whitening, cfg, device=device)
