"""Progressive sparse deconvolution with learned dictionaries.

codes z (B, d) → x_J → x_{J-1} → … → x_0 = image (B, 3, N, N), where x_j ≈ x∗φ_j sampled
every 2^j pixels, (B, 3, N/2^j, N/2^j), is the low-pass image at scale 2^j.

1. Coarsest image. x_J = Linear(z) + head(F), with F = Linear(z) reshaped to a
   (B, z_channels, N/2^J, N/2^J) feature map. x∗φ_J is the order-0 scattering
   coefficient and z is a linear whitening of S_J, so x_J is (nearly) a *linear* function
   of z: the direct linear path can recover it exactly, the small conv head corrects.
2. One step per scale j = J, …, 1 at the coarse resolution r = N/2^j:
       y_j   = E_j([x_j, inject(z)])                 (B, hidden, r, r)   CNN embedding
       α_j   = coder(y_j)  ≥ 0, sparse               (B, atoms, r, r)
       x_{j-1} = up(x_j) + D_j α_j                   (B, 3, 2r, 2r)
   D_j is a learned dictionary: a stride-2 transposed convolution whose atoms (each
   input channel's 3×k×k filter) have unit ℓ2 norm, normalised in forward and projected
   back onto the sphere by `after_optimizer_step()`. `up` is the grid-exact ×2
   interpolation (coarse sample k on fine sample 2k, as the scattering subsamples), so D_j
   only synthesises the detail between two scales (`residual`). z enters every step:
   `inject="map"` concatenates F, upsampled to r (the scattering code is a map on the
   N/2^J grid); `"film"` modulates E_j's first layer per channel; `"both"` does both.
3. Sparse coder. `lista`: α is the non-negative sparse code of y in a learned feature
   dictionary B_j (1×1 conv), from unrolled ISTA for  min_{α≥0} ½‖y − B_j α‖² + θ·α :
       α ← ρ(W_e y),  then `lista_iters` times  α ← ρ(α + W_e(y − B_j α)),
   and the same code synthesises the finer image through D_j: the coupled dictionaries
   (B_j, D_j) of sparse-coding super-resolution (Yang et al. 2010), learnt end to end.
   `cnn`: α = ρ(conv3×3(y)), one shot. ρ is ReLU or the non-negative soft threshold
   ReLU(x − θ) with learned θ. `code_norm` normalises the first pre-shrinkage code over the
   atoms at each position: at initialisation a random atom only adds error, so every α is
   pushed below 0 and a dead code never teaches its atom; normalised, some atom at every
   position stays above threshold until the atoms are useful.
4. Loss: Σ_j w_j · loss(x_j, x∗φ_j ↓2^j) over j = 0 … J, weights uniform or geometric
   (the full-resolution scale always carries weight), plus `l1_penalty` · mean(α). The
   targets use the scattering's own low-pass φ_j (kymatio's Gaussian, reflect padding, its
   sampling grid; for j = J the filter of S_J), not a Gaussian pyramid, so that the coarse
   targets agree with what the scattering measures. DC gain 1, so a constant image stays
   that constant at every scale; the filters are non-persistent buffers.

The measurements behind these defaults are in benchmarks/README.md ("Sparse deconvolution:
notes moved from the code"); `scatgen.cli` (the atoms command) reports a trained model's atoms and sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from scatgen.generators.base import Generator, GeneratorConfig, regression_loss


@dataclass
class SparseDeconvConfig(GeneratorConfig):
    kind: str = "sparse_deconv"
    coder: str = "lista"  # lista | cnn: how the sparse codes α_j are computed
    shrink: str = "relu"  # relu | soft: non-negative shrinkage (soft = ReLU(x − θ), learned θ per channel)
    lista_iters: int = 2  # lista: unrolled iterations after the first α = ρ(W_e y); >= 0
    atoms: int = 64  # C_j, atoms per dictionary D_j (channels of α_j), every scale
    atom_size: int = 4  # k, atom side in pixels at the finer scale (transposed conv kernel); >= 2
    hidden: int = 64  # width of each scale's CNN
    z_channels: int = 32  # channels of the code feature map at N/2^J (inject map/both, coarse head)
    inject: str = "map"  # map | film | both: how z enters each scale step
    code_norm: bool = True  # normalise the pre-shrinkage code over channels at each position (keeps codes alive)
    residual: bool = True  # x_{j-1} = up(x_j) + D_j α_j (True) or D_j α_j (False)
    output: str = "clamp"  # clamp | tanh | none: applied to the full-resolution image only
    scale_weights: str = "uniform"  # uniform | geometric: weight of scale j in the loss (normalised to sum 1)
    scale_decay: float = 0.5  # geometric: w_j ∝ scale_decay^j (j = 0 is full resolution); > 0
    l1_penalty: float = 0.0  # weight of mean(α) over all scales added to the loss; >= 0

    def validate(self) -> None:
        choices = {
            "coder": ("lista", "cnn"),
            "shrink": ("relu", "soft"),
            "inject": ("map", "film", "both"),
            "output": ("clamp", "tanh", "none"),
            "scale_weights": ("uniform", "geometric"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"generator.{name}={getattr(self, name)!r}; expected one of {', '.join(allowed)}")
        positive = {"atoms": self.atoms, "hidden": self.hidden, "z_channels": self.z_channels}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"generator.{name}={value} must be >= 1")
        if self.lista_iters < 0:
            raise ValueError(f"generator.lista_iters={self.lista_iters} must be >= 0")
        if self.atom_size < 2:
            raise ValueError(f"generator.atom_size={self.atom_size} must be >= 2 (stride-2 atoms)")
        if not self.scale_decay > 0:
            raise ValueError(f"generator.scale_decay={self.scale_decay} must be > 0")
        if self.l1_penalty < 0:
            raise ValueError(f"generator.l1_penalty={self.l1_penalty} must be >= 0")


# ----------------------------------------------------------------------------------------
# Low-pass pyramid: the scattering's Gaussian φ_j, sampled every 2^j pixels.


def _pad_for(size: int, j: int) -> int:
    """Reflect padding for φ_j on a side of `size`: 2^(j+1) ≈ 5σ, and < size (reflect)."""
    return min(2 ** (j + 1), size - 1)


@lru_cache(maxsize=64)
def _phi_fourier_np(size: int, j: int) -> np.ndarray:
    """Real Fourier transform of kymatio's low-pass at scale 2^j on a (size, size) grid, DC gain 1."""
    from kymatio.scattering2d.filter_bank import gabor_2d

    phi = np.real(np.fft.fft2(gabor_2d(size, size, 0.8 * 2 ** (j - 1), 0, 0))).astype(np.float64)
    return (phi / phi[0, 0]).astype(np.float32)


def _lowpass(images: torch.Tensor, j: int, phi_hat: torch.Tensor) -> torch.Tensor:
    """x∗φ_j sampled at 0, 2^j, … (reflect padding, product in Fourier)."""
    n = images.shape[-1]
    p = _pad_for(n, j)
    x = F.pad(images.float(), (p, p, p, p), mode="reflect")
    x = torch.fft.ifft2(torch.fft.fft2(x) * phi_hat).real
    return x[..., p : p + n : 2**j, p : p + n : 2**j].contiguous()


class LowpassPyramid(nn.Module):
    """images (B, C, N, N) → [x∗φ_J↓2^J, …, x∗φ_1↓2, x] (coarse to fine, scales J … 0), float32.

    The Fourier filters are precomputed as non-persistent buffers: never in a state_dict."""

    def __init__(self, image_size: int, J: int) -> None:
        super().__init__()
        self.J, self.image_size = J, image_size
        for j in range(1, J + 1):
            phi = torch.from_numpy(_phi_fourier_np(image_size + 2 * _pad_for(image_size, j), j).copy())
            self.register_buffer(f"phi_{j}", phi, persistent=False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"expected images (B, C, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")
        with torch.autocast(device_type=images.device.type, enabled=False):
            out = [_lowpass(images, j, getattr(self, f"phi_{j}")) for j in range(self.J, 0, -1)]
            out.append(images.float())
        return out


# ----------------------------------------------------------------------------------------
# Building blocks.


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Grid-exact ×2 interpolation: out[2k] = x[k], out[2k+1] = (x[k] + x[k+1]) / 2 (edge replicated)."""
    nxt = torch.cat([x[..., 1:, :], x[..., -1:, :]], dim=-2)
    x = torch.stack([x, 0.5 * (x + nxt)], dim=-2).flatten(-3, -2)  # (B, C, 2H, W)
    nxt = torch.cat([x[..., 1:], x[..., -1:]], dim=-1)
    return torch.stack([x, 0.5 * (x + nxt)], dim=-1).flatten(-2)  # (B, C, 2H, 2W)


class Dictionary(nn.Module):
    """D: (B, C, r, r) → (B, 3, 2r, 2r), a stride-2 transposed conv with unit-norm atoms weight[c] (3, k, k)."""

    def __init__(self, atoms: int, k: int, out_channels: int = 3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(atoms, out_channels, k, k))
        # (r−1)·2 − 2p + k + op = 2r  ⇒  even k: p = (k−2)/2, op = 0; odd k: p = (k−1)/2, op = 1.
        self.padding = (k - 2) // 2 if k % 2 == 0 else (k - 1) // 2
        self.output_padding = 0 if k % 2 == 0 else 1
        self.renormalize_()

    def atoms(self) -> torch.Tensor:
        """(C, 3, k, k), each atom at unit ℓ2 norm."""
        w = self.weight
        return w / w.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)

    @torch.no_grad()
    def renormalize_(self) -> None:
        self.weight.div_(self.weight.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1))

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        w = self.atoms().to(alpha.dtype)
        return F.conv_transpose2d(alpha, w, stride=2, padding=self.padding, output_padding=self.output_padding)


class Shrink(nn.Module):
    """ρ: ReLU, or the non-negative soft threshold ReLU(x − θ) with learned per-channel θ."""

    def __init__(self, kind: str, channels: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(channels)) if kind == "soft" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.theta is not None:
            x = x - self.theta.view(1, -1, 1, 1).to(x.dtype)
        return F.relu(x)


class ChannelNorm(nn.Module):
    """LayerNorm over channels at each position, (B, C, H, W): zero mean across atoms, so some atom is
    always above 0 before the affine map — a position's code cannot die for good. Gain starts small."""

    def __init__(self, channels: int, gain: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), gain))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.movedim(1, -1), x.shape[1:2], eps=1e-5).movedim(-1, 1)
        return x * self.weight.view(1, -1, 1, 1).to(x.dtype) + self.bias.view(1, -1, 1, 1).to(x.dtype)


class ScaleStep(nn.Module):
    """One scale: coarse image x_j (+ z) → sparse code α_j → finer image x_{j-1}."""

    def __init__(self, cfg: SparseDeconvConfig, code_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        h, c = cfg.hidden, cfg.atoms
        c_in = 3 + (cfg.z_channels if cfg.inject in ("map", "both") else 0)
        self.conv1 = nn.Conv2d(c_in, h, 3, padding=1, padding_mode="replicate")
        self.film = nn.Linear(code_dim, 2 * h) if cfg.inject in ("film", "both") else None
        self.conv2 = nn.Conv2d(h, h, 3, padding=1, padding_mode="replicate")
        if cfg.coder == "cnn":
            self.analysis = nn.Conv2d(h, c, 3, padding=1, padding_mode="replicate")
            self.shrinks = nn.ModuleList([Shrink(cfg.shrink, c)])
            self.feature_dict = None
        else:
            self.analysis = nn.Conv2d(h, c, 1, bias=False)  # W_e (θ plays the bias)
            self.feature_dict = nn.Conv2d(c, h, 1, bias=False)  # B_j
            self.shrinks = nn.ModuleList([Shrink(cfg.shrink, c) for _ in range(cfg.lista_iters + 1)])
        self.norm = ChannelNorm(c) if cfg.code_norm else nn.Identity()
        self.dictionary = Dictionary(c, cfg.atom_size)

    def code(self, x: torch.Tensor, zmap: torch.Tensor | None, codes: torch.Tensor) -> torch.Tensor:
        inp = x if zmap is None else torch.cat([x, F.interpolate(zmap, size=x.shape[-2:], mode="bilinear",
                                                                  align_corners=False)], dim=1)
        y = self.conv1(inp)
        if self.film is not None:
            gamma, beta = self.film(codes).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
            y = y * (1 + gamma) + beta
        y = self.conv2(F.relu(y))
        alpha = self.shrinks[0](self.norm(self.analysis(y)))
        if self.feature_dict is not None:
            for shrink in self.shrinks[1:]:
                alpha = shrink(alpha + self.analysis(y - self.feature_dict(alpha)))
        return alpha

    def forward(self, x: torch.Tensor, zmap: torch.Tensor | None,
                codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.code(x, zmap, codes)
        detail = self.dictionary(alpha)
        return (upsample2(x) + detail if self.cfg.residual else detail), alpha


# ----------------------------------------------------------------------------------------
# The generator.


class SparseDeconvGenerator(Generator):
    def __init__(self, cfg: SparseDeconvConfig, code_dim: int, image_size: int, J: int, L: int = 8) -> None:
        super().__init__(code_dim, image_size)
        cfg.validate()
        if J < 1 or image_size % 2**J:
            raise ValueError(f"image_size={image_size} must be a multiple of 2^J={2**J} (J={J} >= 1)")
        self.cfg, self.J, self.L = cfg, J, L
        n0 = image_size // 2**J
        self.n0 = n0
        zc = cfg.z_channels
        self.to_coarse = nn.Linear(code_dim, 3 * n0 * n0)  # exact linear path to x∗φ_J
        self.to_zmap = nn.Linear(code_dim, zc * n0 * n0)
        self.coarse_head = nn.Sequential(
            nn.Conv2d(zc, cfg.hidden, 3, padding=1, padding_mode="replicate"), nn.ReLU(),
            nn.Conv2d(cfg.hidden, 3, 3, padding=1, padding_mode="replicate"),
        )
        self.steps = nn.ModuleList([ScaleStep(cfg, code_dim) for _ in range(J)])  # steps[i]: scale J−i → J−i−1
        self.lowpass = LowpassPyramid(image_size, J)
        if cfg.scale_weights == "uniform":
            w = [1.0] * (J + 1)
        else:
            w = [cfg.scale_decay ** j for j in range(J, -1, -1)]  # coarse to fine, j = J … 0
        total = sum(w)
        self.scale_weights = [x / total for x in w]

    # -- synthesis ---------------------------------------------------------------------
    def generate_with_codes(self, codes: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """codes (B, d) → (images (B, 3, N, N), pyramid [x_J, …, x_0], alphas [α_J, …, α_1]).

        pyramid[i] is the prediction at scale J−i, (B, 3, N/2^(J−i), N/2^(J−i)), pyramid[-1] the
        image before the output nonlinearity; alphas[i] is (B, atoms, N/2^(J−i), N/2^(J−i)).
        """
        B = codes.shape[0]
        zmap = self.to_zmap(codes).view(B, self.cfg.z_channels, self.n0, self.n0)
        x = self.to_coarse(codes).view(B, 3, self.n0, self.n0) + self.coarse_head(zmap)
        inject = zmap if self.cfg.inject in ("map", "both") else None
        pyramid, alphas = [x], []
        for step in self.steps:
            x, alpha = step(x, inject, codes)
            pyramid.append(x)
            alphas.append(alpha)
        return self._output(x), pyramid, alphas

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.output == "tanh":
            return torch.tanh(x)
        if self.cfg.output == "clamp":
            return x.clamp(-1.0, 1.0)
        return x

    def generate(self, codes: torch.Tensor) -> torch.Tensor:
        return self.generate_with_codes(codes)[0]

    def lowpass_pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, N, N) → true low-pass images [x∗φ_J↓2^J, …, x] (scales J … 0)."""
        return self.lowpass(images)

    def forward(
        self, codes: torch.Tensor, targets: torch.Tensor | None = None, loss: str = "l1"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        images, pyramid, alphas = self.generate_with_codes(codes)
        if targets is None:
            return images, None
        true = self.lowpass(targets)
        # The full-resolution term uses the output image (after clamp/tanh) itself.
        preds = pyramid[:-1] + [images]
        total = codes.new_zeros((), dtype=torch.float32)
        stats: dict[str, float] = {}
        for i, (pred, tgt, w) in enumerate(zip(preds, true, self.scale_weights)):
            j = self.J - i
            term = regression_loss(pred.float(), tgt, loss)
            total = total + w * term
            stats[f"loss_scale_{j}"] = float(term.detach())
        if self.cfg.l1_penalty > 0:
            total = total + self.cfg.l1_penalty * sum(a.float().mean() for a in alphas)
        for i, a in enumerate(alphas):
            stats[f"sparsity_{self.J - i}"] = float((a.detach() == 0).float().mean())
        self.stats = stats
        return images, total

    # -- dictionaries --------------------------------------------------------------------
    def dictionaries(self) -> list[Dictionary]:
        """[D_J, …, D_1]."""
        return [step.dictionary for step in self.steps]

    @torch.no_grad()
    def renormalize_atoms_(self) -> None:
        """Project every dictionary's stored atoms back onto the unit ℓ2 sphere, in place."""
        for d in self.dictionaries():
            d.renormalize_()

    def after_optimizer_step(self) -> None:
        """Hook the trainer calls after each optimizer step."""
        self.renormalize_atoms_()


__all__ = [
    "LowpassPyramid",
    "SparseDeconvConfig",
    "SparseDeconvGenerator",
    "upsample2",
]
