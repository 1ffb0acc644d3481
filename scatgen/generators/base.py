"""The interface every generator shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class GeneratorConfig:
    kind: str = ""  # registry name, see scatgen.generators

    def validate(self) -> None:
        """Raise ValueError on a bad value; subclasses extend."""

    def check_image_size(self, image_size: int, J: int) -> None:
        """Raise ValueError if this generator cannot produce `image_size`² images; subclasses restrict."""


def regression_loss(recons: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean absolute (l1) or squared (l2) error."""
    if loss == "l1":
        return F.l1_loss(recons, targets)
    if loss == "l2":
        return F.mse_loss(recons, targets)
    raise ValueError(f"loss must be 'l1' or 'l2', got {loss!r}")


class Generator(nn.Module):
    """codes (B, d) → images (B, 3, N, N) in [-1, 1].

    `forward(codes)` returns (images, None); `forward(codes, targets, loss)` returns
    (images, scalar loss). The loss lives in forward (as in nanoGPT) so that a
    generator with a multiscale objective works through DDP unchanged.
    """

    def __init__(self, code_dim: int, image_size: int) -> None:
        super().__init__()
        self.code_dim = code_dim
        self.image_size = image_size
        # Extra scalars a generator wants logged (e.g. per-scale losses), refreshed each forward.
        self.stats: dict[str, float] = {}

    def generate(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, codes: torch.Tensor, targets: torch.Tensor | None = None, loss: str = "l1"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        images = self.generate(codes)
        if targets is None:
            return images, None
        return images, regression_loss(images, targets, loss)
