"""The DCGAN-like GSN generator (Angles & Mallat 2018).

codes (B, d) → Linear → (B, C, 4, 4) → log2(N/4) blocks of
[×2 upsampling, k×k conv, norm, ReLU] with channels halving → k×k conv → tanh → (B, 3, N, N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from scatgen.generators.base import Generator, GeneratorConfig


@dataclass
class GSNConfig(GeneratorConfig):
    kind: str = "gsn"
    channels: int = 64  # channels at 4×4; halved by each upsampling block (chosen by benchmarks/architecture_sweep.py)
    min_channels: int = 16  # floor on the halving
    kernel_size: int = 3  # odd conv kernel size; the original uses 7
    upsample: str = "nearest"  # nearest | bilinear | transposed
    norm: str = "batch"  # batch | group | none
    bn_momentum: float = 0.1  # PyTorch convention; the original's Keras 0.9 is a bug
    padding: str = "reflect"  # reflect | zeros
    bias: bool = False  # conv bias (redundant before a norm layer)

    def validate(self) -> None:
        choices = {"upsample": ("nearest", "bilinear", "transposed"), "norm": ("batch", "group", "none"),
                   "padding": ("reflect", "zeros")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"generator.{name}={getattr(self, name)!r}; expected one of {', '.join(allowed)}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"generator.kernel_size={self.kernel_size} must be odd and >= 1")
        if self.channels < 1 or self.min_channels < 1:
            raise ValueError("generator.channels and generator.min_channels must be >= 1")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError(f"generator.bn_momentum={self.bn_momentum} must be in (0, 1]")

    def check_image_size(self, image_size: int, J: int) -> None:
        # Doubling blocks from a 4×4 start.
        if image_size < 4 or image_size & (image_size - 1):
            raise ValueError(f"data.image_size={image_size}: the gsn generator makes sizes 4·2^k (32, 64, 128, …); "
                             f"pick one of those or generator.kind=sparse_deconv")


def _norm(kind: str, channels: int, momentum: float) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, momentum=momentum)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    return nn.Identity()


def _conv(cfg: GSNConfig, c_in: int, c_out: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, cfg.kernel_size, padding=cfg.kernel_size // 2,
                     padding_mode="reflect" if cfg.padding == "reflect" else "zeros", bias=bias)


def _upsampling_block(cfg: GSNConfig, c_in: int, c_out: int) -> nn.Sequential:
    if cfg.upsample == "transposed":
        layers = [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=cfg.bias)]
    else:
        layers = [nn.Upsample(scale_factor=2, mode=cfg.upsample), _conv(cfg, c_in, c_out, cfg.bias)]
    return nn.Sequential(*layers, _norm(cfg.norm, c_out, cfg.bn_momentum), nn.ReLU(inplace=True))


class GSNGenerator(Generator):
    def __init__(self, cfg: GSNConfig, code_dim: int, image_size: int, J: int = 4, L: int = 8) -> None:
        super().__init__(code_dim, image_size)
        blocks = int(math.log2(image_size // 4))
        if 4 * 2**blocks != image_size:
            raise ValueError(f"the gsn generator needs an image size of 4·2^k, got {image_size}")
        widths = [max(cfg.channels // 2**i, cfg.min_channels) for i in range(blocks + 1)]
        self.project = nn.Sequential(
            nn.Linear(code_dim, widths[0] * 16, bias=False),
            nn.Unflatten(1, (widths[0], 4, 4)),
            _norm(cfg.norm, widths[0], cfg.bn_momentum),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.Sequential(*[_upsampling_block(cfg, widths[i], widths[i + 1]) for i in range(blocks)])
        self.to_image = nn.Sequential(_conv(cfg, widths[-1], 3, bias=True), nn.Tanh())

    def generate(self, codes: torch.Tensor) -> torch.Tensor:
        return self.to_image(self.blocks(self.project(codes)))
