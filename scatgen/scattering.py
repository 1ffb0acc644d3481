"""images → coeffs: the fixed order-2 wavelet scattering transform S_J.

    S_J x = ( x∗φ_J,  |x∗ψ_λ1|∗φ_J,  ||x∗ψ_λ1|∗ψ_λ2|∗φ_J )

Colour images are scattered per channel:
(B, 3, N, N) → (B, 3K, N/2^J, N/2^J) with K = 1 + JL + L²J(J−1)/2.

Two backends compute the same numbers: `fast` (scatgen.scattering_fast, vectorised)
and `kymatio` (the reference). Filters are buffers that never enter a state_dict.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from scatgen.config import scattering_channels


def _kymatio_module(J: int, shape: tuple[int, int], L: int) -> nn.Module:
    # `kymatio.torch` also imports the 3D frontend, which fails with scipy >= 1.17.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    module = ScatteringTorch2D(J=J, shape=shape, L=L, max_order=2)
    # Filters are a pure function of (J, L, shape): keep them out of state_dicts.
    for name, buf in list(module.named_buffers(recurse=False)):
        module._buffers.pop(name)
        module.register_buffer(name, buf, persistent=False)
    return module


class Scattering(nn.Module):
    """Order-2 scattering per colour channel.

    images (B, C, H, W) → coeffs (B, C·K, H/2^J, W/2^J), K = 1 + JL + L²J(J−1)/2.
    """

    def __init__(
        self,
        J: int,
        image_size: int | tuple[int, int],
        L: int = 8,
        backend: str = "fast",
        cache_dir: str | Path | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        shape = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if shape[0] % 2**J or shape[1] % 2**J:
            raise ValueError(f"image size {shape} must be a multiple of 2^J = {2**J} (J={J})")
        self.J, self.L, self.shape, self.backend = J, L, shape, backend
        self.K = scattering_channels(J, L)
        if backend == "kymatio":
            self.transform = _kymatio_module(J, shape, L)
        elif backend == "fast":
            from scatgen.scattering_fast import FastScattering2D

            self.transform = FastScattering2D(J=J, shape=shape, L=L, cache_dir=cache_dir)
        else:
            raise ValueError(f"encoder.backend must be 'fast' or 'kymatio', got {backend!r}")
        if compile:
            self.transform.compile()

    @property
    def out_shape(self) -> tuple[int, int, int]:
        """(3K, H/2^J, W/2^J) for RGB input."""
        return (3 * self.K, self.shape[0] // 2**self.J, self.shape[1] // 2**self.J)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[-2:]) != self.shape:
            raise ValueError(
                f"expected images of shape (B, C, {self.shape[0]}, {self.shape[1]}), got {tuple(images.shape)}"
            )
        coeffs = self.transform(images.float().contiguous())  # (B, C, K, H', W')
        B, C, K, h, w = coeffs.shape
        return coeffs.reshape(B, C * K, h, w)
