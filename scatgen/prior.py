"""codes → prior: a density on the whitened codes, fitted after training, to draw codes from.

The whitening makes the codes white (identity covariance), not Gaussian. For data on a
low-dimensional manifold, such as polygons, most of N(0, I) lies off it, and G maps those
codes to blobs. A density fitted ex post to the train codes keeps samples on the manifold.

    normal       z ~ N(0, I), the paper's choice; nothing to fit
    gmm          a Gaussian mixture fitted by EM (the ex-post density of RAE, Ghosh et al. 2020)
    flow         flow matching (Lipman et al. 2023): an MLP velocity field v(y, t) carries
                 N(0, I) at t = 0 to the codes at t = 1 along straight paths
                 y_t = (1 − t) ε + t y; sampling integrates dy/dt = v with Heun's method.
                 The MLP sees t at its input (prior.conditioning=input) or in every block
                 through adaLN (adaln); prior.ema samples with the weights' moving average
    latent_flow  two stages: an autoencoder d → k → d on the codes, and a flow on its k-d latent;
                 each has its own width (prior.autoencoder_width, prior.width), so that
                 either can be sized without the other

gmm and flow model the `dims` leading components and draw the rest from N(0, I). latent_flow
draws all d: refinement sharpens a sample only towards a code that some image has, in every
component (benchmarks/README.md), so a sample's trailing components must follow its leading ones.
Its autoencoder weighs component k's squared error by λ_k^γ (γ = prior.code_weighting, λ the
whitening's eigenvalues): refinement weighs a whitened error by a power of λ too, so the
autoencoder spends its capacity where an error costs the refined image most, not evenly over
directions the whitening has made equal.

Flows are invertible: `to_noise` carries codes to the noise the discrete sampler starts from
(solving each Heun step backwards), `from_noise` carries it back, and what the prior cannot
reproduce of a code is returned as a residual, so the round trip is exact. `vary` mixes a code's
state with fresh noise part of the way and integrates back. `temperature` scales the starting
noise. prior.sde_noise > 0 draws samples along an SDE with the ODE's marginals, whose noise
corrects the field's errors on the way (benchmarks/README.md). prior.guide_at keeps a copy of the
field from early in its fit, and prior.guidance w > 1 then draws samples along guide + w (field −
guide): autoguidance (Karras et al. 2024), which steers away from the errors that the weaker copy
makes more of, without a class label. Interpolation and variations follow the field alone. A fit
stops at its steps or at prior.max_minutes (shared by its stages in proportion to their steps),
whichever comes first, and its learning rate decays over the same; a fit on the clock runs its
steps under bf16 autocast where they time faster than in float32 (prior.mixed_precision). A prior
is saved as safetensors with its settings as JSON metadata; nothing is pickled.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from scatgen.checks import check_strength
from scatgen.config import PriorConfig
from scatgen.speed import StepPrecision, describe_precision, work_done
from scatgen.utils import atomic_path, progress_bar


LatentMap = Callable[[torch.Tensor], torch.Tensor]


class CodePrior(nn.Module):
    """A distribution over codes (d,) that can be sampled and saved."""

    kind = ""

    def __init__(self, d: int, dims: int = 0) -> None:
        super().__init__()
        self.steps_taken: dict[str, int] = {}  # optimizer steps of each stage of the fit that made it (not saved)
        self.step_precision: dict[str, str] = {}  # and the precision they ran in (`describe_precision`)
        if not 0 <= dims <= d:
            raise ValueError(f"prior.dims={dims} must be between 0 (all) and the code size d={d}")
        self.d = d
        self.dims = dims or d  # the leading components this prior models; the rest are N(0, I)

    def settings(self) -> dict[str, Any]:
        """JSON-serialisable arguments that rebuild the module (with its tensors)."""
        return {"d": self.d, "dims": self.dims}

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, temperature: float = 1.0) -> torch.Tensor:
        """n codes (n, d), a pure function of (seed, temperature) on CPU."""
        if n < 1:
            raise ValueError(f"the number of samples must be >= 1, got {n}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        generator = torch.Generator().manual_seed(seed)
        rest = temperature * torch.randn(n, self.d - self.dims, generator=generator)
        return torch.cat([self._sample(n, generator, temperature), rest], dim=1)

    def _sample(self, n: int, generator: torch.Generator, temperature: float) -> torch.Tensor:
        """n draws of the modelled components (n, modelled)."""
        raise NotImplementedError

    invertible = False  # whether codes map to the prior's noise and back (to_noise, from_noise)

    def to_noise(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """codes (n, d) → (noise (n, m), residual (n, d)) with from_noise(noise, residual) == codes.

        The noise is where the prior's sampler would start to draw each code; the residual is
        what of the code that draw leaves out (exactly 0 for a code the prior can draw)."""
        self._require_inverse()
        noise = self._to_noise(codes)
        return noise, codes.float() - self._from_noise(noise)

    def from_noise(self, noise: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The codes (n, d) that the prior draws from noise (n, m), plus the residual if given."""
        self._require_inverse()
        codes = self._from_noise(noise)
        return codes if residual is None else codes + residual

    def vary(self, codes: torch.Tensor, strength: float, seed: int = 0) -> torch.Tensor:
        """Codes (n, d) that keep `1 − strength` of each code and redraw the rest from the prior."""
        self._require_inverse()
        strength = check_strength(strength)
        generator = torch.Generator().manual_seed(seed)
        keep = 1.0 - strength  # a mix that keeps N(0, I) codes N(0, I)
        return keep * codes.float() + math.sqrt(1 - keep**2) * torch.randn(codes.shape, generator=generator)

    def latent_maps(self) -> tuple[LatentMap, LatentMap] | None:
        """(codes → latents, latents → codes), differentiable, where this prior's codes are a
        function of a latent (refinement may then move a drawn code along that surface); else None."""
        return None

    def _require_inverse(self) -> None:
        if not self.invertible:
            raise ValueError(f"the '{self.kind}' prior has no inverse (codes cannot be carried to its noise); "
                             f"use a flow, latent_flow or normal prior, or path='code'")

    def _to_noise(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float().clone()

    def _from_noise(self, noise: torch.Tensor) -> torch.Tensor:
        return noise.float().clone()


class NormalPrior(CodePrior):
    """z ~ N(0, T² I); its noise is the code itself."""

    kind = "normal"
    invertible = True

    def _sample(self, n: int, generator: torch.Generator, temperature: float) -> torch.Tensor:
        return temperature * torch.randn(n, self.dims, generator=generator)


class GaussianMixturePrior(CodePrior):
    """Σ_k π_k N(m_k, C_k), with C_k = A_k A_kᵀ (full) or diagonal."""

    kind = "gmm"

    def __init__(self, d: int, components: int, covariance: str = "full", dims: int = 0) -> None:
        super().__init__(d, dims)
        self.covariance = covariance
        d = self.dims
        self.register_buffer("weights", torch.full((components,), 1.0 / components))
        self.register_buffer("means", torch.zeros(components, d))
        # A_k for full covariances, the standard deviations for diagonal ones.
        self.register_buffer("scales", torch.eye(d).repeat(components, 1, 1) if covariance == "full"
                             else torch.ones(components, d))

    def settings(self) -> dict[str, Any]:
        return {"d": self.d, "dims": self.dims, "components": len(self.weights), "covariance": self.covariance}

    def _sample(self, n: int, generator: torch.Generator, temperature: float) -> torch.Tensor:
        which = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)
        eps = temperature * torch.randn(n, self.dims, generator=generator)
        scales = self.scales.cpu()[which]
        offsets = torch.einsum("nij,nj->ni", scales, eps) if self.covariance == "full" else scales * eps
        return self.means.cpu()[which] + offsets


def fit_gmm(codes: torch.Tensor, components: int = 10, covariance: str = "full", iterations: int = 100,
            reg: float = 1e-3, seed: int = 0, progress: bool = False, dims: int = 0) -> GaussianMixturePrior:
    """EM on the `dims` leading components of codes (n, d) (0: all) in float64; k-means++
    seeding; `reg` is added to every covariance's diagonal."""
    prior = GaussianMixturePrior(codes.shape[1], components, covariance, dims)
    x = codes[:, :prior.dims].double()
    n, d = x.shape
    if n < components:
        raise ValueError(f"a {components}-component mixture needs at least {components} codes, got {n}")
    generator = torch.Generator().manual_seed(seed)
    centres = [x[torch.randint(n, (1,), generator=generator)].squeeze(0)]
    for _ in range(1, components):
        d2 = torch.cdist(x, torch.stack(centres)).min(1).values.square()
        centres.append(x[torch.multinomial(d2 / d2.sum(), 1, generator=generator)].squeeze(0))
    means = torch.stack(centres)
    resp = torch.nn.functional.one_hot(torch.cdist(x, means).argmin(1), components).double()
    eye = torch.eye(d, dtype=torch.float64)
    previous = -math.inf
    for _ in progress_bar(range(iterations), desc="fitting gmm prior", disable=not progress, leave=False):
        # M step
        counts = resp.sum(0) + 1e-10
        weights = counts / n
        means = (resp.T @ x) / counts[:, None]
        if covariance == "full":
            covs = torch.stack([((resp[:, k, None] * (x - means[k])).T @ (x - means[k])) / counts[k]
                                for k in range(components)]) + reg * eye
            chol = torch.linalg.cholesky(covs)
            # log N(x | m_k, C_k) through the Cholesky factor: a triangular solve per component.
            maha = torch.stack([torch.linalg.solve_triangular(chol[k], (x - means[k]).T, upper=False).square().sum(0)
                                for k in range(components)], 1)
            logdet = 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
        else:
            var = (resp.T @ x.square()) / counts[:, None] - means.square() + reg
            maha = ((x[:, None, :] - means[None]).square() / var[None]).sum(2)
            logdet = torch.log(var).sum(1)
        # E step
        log_p = torch.log(weights) - 0.5 * (maha + logdet + d * math.log(2 * math.pi))
        log_norm = torch.logsumexp(log_p, 1, keepdim=True)
        resp = torch.exp(log_p - log_norm)
        mean_ll = log_norm.mean().item()
        if mean_ll - previous < 1e-6 * abs(mean_ll):
            break
        previous = mean_ll
    prior.weights.copy_(weights.float())
    prior.means.copy_(means.float())
    prior.scales.copy_((chol if covariance == "full" else var.sqrt()).float())
    return prior


def time_features(t: torch.Tensor, dim: int = 64) -> torch.Tensor:
    """Sinusoidal features of t ∈ [0, 1]: (B,) → (B, dim)."""
    freqs = torch.exp(torch.linspace(0, math.log(1000.0), dim // 2, device=t.device))
    angles = t[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResidualMLP(nn.Module):
    """(B, inputs) → (B, outputs): a linear layer, `depth` pre-norm residual blocks, a normed head."""

    def __init__(self, inputs: int, width: int, outputs: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Linear(inputs, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
            for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class VelocityField(ResidualMLP):
    """v(y, t): (B, m), (B,) → (B, m), with the time features at the input only."""

    def __init__(self, d: int, width: int, depth: int) -> None:
        super().__init__(d + 64, width, d, depth)

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.cat([y, time_features(t)], dim=1))


class AdaLNBlock(nn.Module):
    """h + gate(c) · MLP(LN(h) · (1 + scale(c)) + shift(c)): a residual block modulated by the
    time embedding c. The modulation starts at zero, so the block starts as the identity."""

    def __init__(self, width: int, cond: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Linear(cond, 3 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(c).chunk(3, dim=1)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


class AdaLNVelocityField(nn.Module):
    """v(y, t): (B, m), (B,) → (B, m), with t modulating every block (adaLN, as in DiT and MAR's
    diffusion head) instead of entering once at the input: a residual MLP otherwise has to carry
    the time through every layer. The head starts at zero, so the initial field is v = 0."""

    def __init__(self, d: int, width: int, depth: int, cond: int = 128) -> None:
        super().__init__()
        self.inp = nn.Linear(d, width)
        self.time = nn.Sequential(nn.Linear(64, cond), nn.SiLU(), nn.Linear(cond, cond))
        self.blocks = nn.ModuleList(AdaLNBlock(width, cond) for _ in range(depth))
        self.head_norm = nn.LayerNorm(width, elementwise_affine=False)
        self.head_modulation = nn.Linear(cond, 2 * width)
        self.out = nn.Linear(width, d)
        for layer in (self.head_modulation, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = nn.functional.silu(self.time(time_features(t)))
        h = self.inp(y)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.head_modulation(c).chunk(2, dim=1)
        return self.out(self.head_norm(h) * (1 + scale) + shift)


# How the velocity field sees the time: "input" concatenates it to the input once (the default,
# and what priors saved before the setting existed hold); "adaln" modulates every block. At the
# CPU default's budget adaLN costs 1.7x per step and did not measure better (benchmarks/README.md).
VELOCITY_FIELDS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "adaln": AdaLNVelocityField,
    "input": VelocityField,
}


class GuidedField(nn.Module):
    """guide + w (field − guide): a velocity field extrapolated away from a weaker version of
    itself. Where both agree nothing changes; where the weaker one errs more, the step moves further
    from its error."""

    def __init__(self, field: nn.Module, guide: nn.Module, weight: float) -> None:
        super().__init__()
        self.field, self.guide, self.weight = field, guide, weight

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        guide = self.guide(y, t)
        return guide + self.weight * (self.field(y, t) - guide)


@torch.no_grad()
def integrate(velocity: nn.Module, y: torch.Tensor, t0: float, t1: float, steps: int) -> torch.Tensor:
    """Heun's method for dy/dt = v(y, t) from t0 to t1 (either way) in `steps` equal steps."""
    dt = (t1 - t0) / steps
    for i in range(steps):
        t = torch.full((len(y),), t0 + i * dt, device=y.device)
        v = velocity(y, t)
        guess = y + dt * v
        y = y + 0.5 * dt * (v + velocity(guess, t + dt))
    return y


@torch.no_grad()
def invert(velocity: nn.Module, y: torch.Tensor, t0: float, t1: float, steps: int,
           tolerance: float = 1e-6, iterations: int = 50) -> torch.Tensor:
    """The y0 with integrate(velocity, y0, t0, t1, steps) == y: each Heun step undone by a
    fixed-point iteration, so that the inverse is that of the discrete sampler, not of the ODE."""
    dt = (t1 - t0) / steps
    for i in reversed(range(steps)):
        t = torch.full((len(y),), t0 + i * dt, device=y.device)
        target, guess = y, y - dt * velocity(y, t + dt)
        for _ in range(iterations):
            v = velocity(guess, t)
            update = target - 0.5 * dt * (v + velocity(guess + dt * v, t + dt))
            change = (update - guess).norm(dim=1).max() / target.norm(dim=1).max().clamp_min(1e-12)
            guess = update
            if change < tolerance:
                break
        y = guess
    return y


@torch.no_grad()
def integrate_sde(velocity: nn.Module, y: torch.Tensor, steps: int, noise: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Euler–Maruyama from t = 0 to 1 for dy = (v + ½ g² ∇log p_t) dt + g dW with g² = noise · (1 − t):
    the same marginals p_t as dy/dt = v, the score read off the field as −(y − t v) / (1 − t).
    The injected noise lets later steps correct where the field has carried a path wrong, which
    the ODE carries to the end. The last step adds none. Noise is drawn on CPU from `generator`."""
    dt = 1.0 / steps
    for i in range(steps - 1):
        t = i * dt
        v = velocity(y, torch.full((len(y),), t, device=y.device))
        kick = torch.randn(y.shape, generator=generator).to(y.device)
        y = y + dt * (v - 0.5 * noise * (y - t * v)) + math.sqrt(noise * (1 - t) * dt) * kick
    return y + dt * velocity(y, torch.full((len(y),), (steps - 1) * dt, device=y.device))


class FlowPrior(CodePrior):
    """Codes from noise by integrating a learned velocity field from t = 0 (noise) to 1 (data).

    The flow acts on a state y (n, m) that stands for the codes: here the `dims` leading
    components. An ODE is invertible, so a code maps to its noise and back (`to_noise`,
    `from_noise`), which interpolation and variations use. With sde_noise > 0, `sample` follows
    an SDE on the same marginals instead (integrate_sde: 2 × sample_steps Euler steps, as many
    evaluations of the field as Heun's); the maps between codes and noise stay the ODE's.
    With a guide (an earlier copy of the field) and guidance > 1, `sample` follows the GuidedField
    instead, by either sampler; the maps between codes and noise stay the field's own."""

    kind = "flow"
    invertible = True

    def __init__(self, d: int, width: int = 512, depth: int = 3, sample_steps: int = 32, dims: int = 0,
                 conditioning: str = "input", sde_noise: float = 0.0, guided: bool = False,
                 guidance: float = 1.0) -> None:
        super().__init__(d, dims)
        if not (math.isfinite(sde_noise) and sde_noise >= 0):
            raise ValueError(f"sde_noise must be a finite number >= 0 (0 = the ODE), got {sde_noise}")
        self.sde_noise = sde_noise
        if conditioning not in VELOCITY_FIELDS:
            raise ValueError(f"unknown velocity conditioning {conditioning!r}; expected one of "
                             f"{', '.join(VELOCITY_FIELDS)}")
        self.width, self.depth, self.sample_steps, self.conditioning = width, depth, sample_steps, conditioning
        self.velocity = VELOCITY_FIELDS[conditioning](self.state_dims, width, depth)
        # The guide: the field as it was early in the fit (prior.guide_at), kept for guidance.
        self.guide = VELOCITY_FIELDS[conditioning](self.state_dims, width, depth) if guided else None
        self.guidance = guidance

    @property
    def guidance(self) -> float:
        return self._guidance

    @guidance.setter
    def guidance(self, weight: float) -> None:
        if not (math.isfinite(weight) and weight >= 1):
            raise ValueError(f"guidance must be a finite number >= 1 (1 = the field alone), got {weight}")
        if weight != 1 and self.guide is None:
            raise ValueError(f"guidance {weight:g} needs the flow's guide, and this prior kept none; refit it "
                             f"with prior.guide_at > 0 (`sample.py fit-prior RUN --set prior.guide_at=0.25`), "
                             f"or use guidance 1")
        self._guidance = weight

    def sampling_field(self) -> nn.Module:
        """The velocity field that draws samples. The maps between codes and noise, and variations,
        follow the field alone: guidance moves a draw away from where the field would carry its
        noise, so a code inverted through it does not come back along the path it would take."""
        if self.guide is None or self.guidance == 1:
            return self.velocity
        return GuidedField(self.velocity, self.guide, self.guidance)

    @property
    def state_dims(self) -> int:
        return self.dims

    def settings(self) -> dict[str, Any]:
        return {"d": self.d, "dims": self.dims, "width": self.width, "depth": self.depth,
                "sample_steps": self.sample_steps, "conditioning": self.conditioning, "sde_noise": self.sde_noise,
                **self.guide_settings()}

    def guide_settings(self) -> dict[str, Any]:
        # Absent for a prior without a guide, so that its file reads as before the setting existed.
        return {"guided": True, "guidance": self.guidance} if self.guide is not None else {}

    def codes_to_state(self, codes: torch.Tensor) -> torch.Tensor:
        return codes[:, :self.dims]

    def state_to_codes(self, state: torch.Tensor) -> torch.Tensor:
        """Codes (n, d) for states (n, m); components the flow does not model are 0."""
        return torch.cat([state, state.new_zeros(len(state), self.d - self.dims)], dim=1)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _sample(self, n: int, generator: torch.Generator, temperature: float) -> torch.Tensor:
        noise = temperature * torch.randn(n, self.state_dims, generator=generator).to(self._device())
        self.eval()
        if self.sde_noise == 0:
            state = integrate(self.sampling_field(), noise, 0.0, 1.0, self.sample_steps)
        else:
            state = integrate_sde(self.sampling_field(), noise, 2 * self.sample_steps, self.sde_noise, generator)
        return self.state_to_codes(state).cpu()[:, :self.dims]

    @torch.no_grad()
    def _from_noise(self, noise: torch.Tensor) -> torch.Tensor:
        self.eval()
        state = integrate(self.velocity, noise.float().to(self._device()), 0.0, 1.0, self.sample_steps)
        return self.state_to_codes(state).cpu()

    @torch.no_grad()
    def _to_noise(self, codes: torch.Tensor) -> torch.Tensor:
        self.eval()
        state = self.codes_to_state(codes.float().to(self._device()))
        return invert(self.velocity, state, 0.0, 1.0, self.sample_steps).cpu()

    @torch.no_grad()
    def vary(self, codes: torch.Tensor, strength: float, seed: int = 0) -> torch.Tensor:
        """Variations of codes (n, d): each state is mixed with fresh noise to the flow's time
        t = 1 − strength, y_t = t y + (1 − t) ε, and integrated back to t = 1. strength 0 returns
        the codes; 1 is a fresh sample. What the flow does not reproduce of a code (its
        residual) is kept in proportion 1 − strength."""
        strength = check_strength(strength)
        codes = codes.float()
        if strength == 0:
            return codes.clone()
        self.eval()
        t = 1.0 - strength
        state = self.codes_to_state(codes.to(self._device()))
        noise = torch.randn(state.shape, generator=torch.Generator().manual_seed(seed)).to(state.device)
        steps = max(1, math.ceil(self.sample_steps * strength))
        varied = integrate(self.velocity, t * state + (1 - t) * noise, t, 1.0, steps)
        return self.state_to_codes(varied).cpu() + t * (codes - self.project(codes))

    @torch.no_grad()
    def project(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (n, d) as the flow's state represents them (the leading components; for
        latent_flow, the autoencoder's reconstruction): how well the prior's surface fits them."""
        self.eval()
        return self.state_to_codes(self.codes_to_state(codes.float().to(self._device()))).cpu()


class LatentFlowPrior(FlowPrior):
    """A two-stage prior: an autoencoder compresses the codes (n, d) to latents (n, k), and a
    flow models the standardised latents. Samples are decoded latents: every component of a
    sampled code is a function of the k latent ones, so it lies near the surface the codes
    span instead of filling the other d − k directions with independent noise."""

    kind = "latent_flow"

    def __init__(self, d: int, latent: int = 32, width: int = 512, depth: int = 3, sample_steps: int = 32,
                 conditioning: str = "input", autoencoder_width: int = 0, sde_noise: float = 0.0,
                 guided: bool = False, guidance: float = 1.0) -> None:
        self.latent = latent
        # 0: the flow's width (what priors saved before the setting existed hold)
        self.autoencoder_width = autoencoder_width or width
        super().__init__(d, width, depth, sample_steps, dims=0, conditioning=conditioning, sde_noise=sde_noise,
                         guided=guided, guidance=guidance)
        self.encoder = ResidualMLP(d, self.autoencoder_width, latent, depth)
        self.decoder = ResidualMLP(latent, self.autoencoder_width, d, depth)
        self.register_buffer("latent_mean", torch.zeros(latent))
        self.register_buffer("latent_std", torch.ones(latent))

    @property
    def state_dims(self) -> int:
        return self.latent

    def settings(self) -> dict[str, Any]:
        return {"d": self.d, "latent": self.latent, "width": self.width, "depth": self.depth,
                "sample_steps": self.sample_steps, "conditioning": self.conditioning,
                "autoencoder_width": self.autoencoder_width, "sde_noise": self.sde_noise, **self.guide_settings()}

    def codes_to_state(self, codes: torch.Tensor) -> torch.Tensor:
        return (self.encoder(codes) - self.latent_mean) / self.latent_std

    def state_to_codes(self, state: torch.Tensor) -> torch.Tensor:
        return self.decoder(state * self.latent_std + self.latent_mean)

    def latent_maps(self) -> tuple[LatentMap, LatentMap]:
        self.eval()
        return self.codes_to_state, self.state_to_codes


class StageBudget:
    """A fit stage's budget: at most `steps` optimizer steps and, if seconds > 0, that much wall
    time, whichever ends first. The learning rate warms up over 100 steps and then decays along a
    cosine over the same progress, so that a fit cut by the clock still ends at a low rate."""

    def __init__(self, steps: int, seconds: float = 0.0, clock: Callable[[], float] = time.perf_counter) -> None:
        self.steps, self.seconds, self.clock = steps, seconds, clock
        self.start = clock()
        self.taken = 0

    def elapsed(self) -> float:
        return self.clock() - self.start

    def progress(self) -> float:
        done = self.taken / self.steps
        if self.seconds > 0:
            done = max(done, self.elapsed() / self.seconds)
        return done

    def lr_factor(self) -> float:
        return min(1.0, (self.taken + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(self.progress(), 1.0)))


def stage_seconds(cfg: PriorConfig, steps: int, total_steps: int) -> float:
    """A stage's share of cfg.max_minutes (0: no limit), in proportion to its steps."""
    return 60 * cfg.max_minutes * steps / total_steps


def optimise(parameters: list[nn.Parameter], loss_fn: Callable[[], torch.Tensor], cfg: PriorConfig,
             steps: int, seconds: float, progress: bool, desc: str, ema: float = 0.0,
             after_step: Callable[[StageBudget], None] | None = None) -> tuple[int, StepPrecision]:
    """AdamW on loss_fn() within StageBudget(steps, seconds) → the steps taken and the precision
    they ran in (StepPrecision). With ema > 0 the parameters end as their exponential moving
    average (decay ema, warmed up over the first steps as (1 + i) / (10 + i)), which is what
    sampling then uses. after_step(budget), if given, runs after every step."""
    opt = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=0.0)
    current = [p.detach() for p in parameters]  # views of the parameters, which the steps update in place
    averages = [p.clone() for p in current] if ema > 0 else []
    budget = StageBudget(steps, seconds)
    precision = StepPrecision(cfg.mixed_precision, seconds > 0, parameters[0].device.type, "prior.mixed_precision")
    with progress_bar(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        while budget.progress() < 1:
            for group in opt.param_groups:
                group["lr"] = cfg.lr * budget.lr_factor()
            bf16, tic = precision.next(), time.perf_counter()
            with precision.autocast(bf16):
                loss = loss_fn()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the prior's loss became {loss.item()}; lower prior.lr (now {cfg.lr})"
                                         + (" or set prior.mixed_precision=no" if bf16 else ""))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            precision.step_done(bf16, tic)
            if averages:
                decay = min(ema, (1 + budget.taken) / (10 + budget.taken))
                torch._foreach_lerp_(averages, current, 1 - decay)
            work_done()
            budget.taken += 1
            if after_step is not None:
                after_step(budget)
            bar.update(1)
            if seconds > 0 and budget.taken % 100 == 0:  # the clock, not the step bound, usually ends the fit
                bar.set_postfix(min=f"{budget.elapsed() / 60:.1f}/{seconds / 60:.1f}", refresh=False)
    for p, average in zip(current, averages):
        p.copy_(average)
    return budget.taken, precision


def train_velocity(velocity: nn.Module, data: torch.Tensor, cfg: PriorConfig, generator: torch.Generator,
                   device: torch.device | str, progress: bool, desc: str,
                   seconds: float = 0.0, guide: nn.Module | None = None) -> tuple[int, StepPrecision]:
    """Conditional flow matching: regress v(y_t, t) on y − ε along y_t = (1 − t) ε + t y, for
    rows y of data (n, m); → the steps taken (cfg.fit_steps, or fewer when `seconds` run out) and
    their precision. A guide (the field's architecture) receives a copy of the weights as they
    are once cfg.guide_at of the fit has passed."""
    n = len(data)
    pending = guide is not None

    def keep_guide(budget: StageBudget) -> None:
        nonlocal pending
        if pending and budget.progress() >= cfg.guide_at:
            guide.load_state_dict(velocity.state_dict())
            pending = False

    def loss() -> torch.Tensor:
        y1 = data[torch.randint(n, (min(cfg.batch_size, n),), generator=generator)]
        y0 = torch.randn(y1.shape, generator=generator)
        t = torch.rand(len(y1), generator=generator)
        yt = (1 - t[:, None]) * y0 + t[:, None] * y1
        return (velocity(yt.to(device), t.to(device)) - (y1 - y0).to(device)).square().mean()

    velocity.train()
    taken, precision = optimise(list(velocity.parameters()), loss, cfg, cfg.fit_steps, seconds, progress, desc,
                                ema=cfg.ema, after_step=keep_guide if pending else None)
    velocity.eval()
    if guide is not None:
        guide.eval()
    return taken, precision


def fit_flow(codes: torch.Tensor, cfg: PriorConfig, seed: int = 0, device: torch.device | str = "cpu",
             progress: bool = False) -> FlowPrior:
    """Flow matching on the cfg.dims leading components of codes (n, d)."""
    n, d = codes.shape
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prior = FlowPrior(d, cfg.width, cfg.depth, cfg.sample_steps, min(cfg.dims, d), cfg.conditioning,
                          cfg.sde_noise, guided=cfg.guide_at > 0, guidance=cfg.guidance).to(device)
    taken, precision = train_velocity(prior.velocity, prior.codes_to_state(codes.float()), cfg, generator, device,
                                      progress, "fitting flow prior", stage_seconds(cfg, cfg.fit_steps, cfg.fit_steps),
                                      guide=prior.guide)
    prior.steps_taken = {"flow": taken}
    prior.step_precision = {"flow": describe_precision(precision)}
    return prior.cpu().eval()


def code_weights(eigenvalues: torch.Tensor | None, gamma: float, d: int) -> torch.Tensor:
    """Per-component loss weights (d,): λ_k^γ / mean(λ^γ) for the eigenvalues (d,); ones where γ = 0."""
    if gamma == 0:
        return torch.ones(d)
    if eigenvalues is None:
        raise ValueError(f"prior.code_weighting={gamma} weighs the codes by the whitening's eigenvalues, and none "
                         f"were given; pass eigenvalues=whitening.eigenvalues, or set prior.code_weighting=0")
    if eigenvalues.ndim != 1 or not bool((eigenvalues > 0).all()):
        raise ValueError(f"eigenvalues must be a positive vector (d,), got shape {tuple(eigenvalues.shape)}")
    if len(eigenvalues) != d:
        raise ValueError(f"{len(eigenvalues)} eigenvalues for codes of d={d}: pass the whitening's that made the codes")
    weights = eigenvalues.double().pow(gamma)
    return (weights / weights.mean()).float()


def fit_latent_flow(codes: torch.Tensor, cfg: PriorConfig, seed: int = 0, device: torch.device | str = "cpu",
                    progress: bool = False, eigenvalues: torch.Tensor | None = None) -> LatentFlowPrior:
    """Two stages on codes (n, d): an autoencoder d → cfg.latent → d (cfg.autoencoder_steps of
    Adam on the squared error weighted by code_weights(eigenvalues, cfg.code_weighting), with
    cfg.latent_noise on the latents), then flow matching on its standardised latents (cfg.fit_steps)."""
    n, d = codes.shape
    weights = code_weights(eigenvalues, cfg.code_weighting, d).to(device)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prior = LatentFlowPrior(d, cfg.latent, cfg.width, cfg.depth, cfg.sample_steps, cfg.conditioning,
                                cfg.autoencoder_width, cfg.sde_noise, guided=cfg.guide_at > 0,
                                guidance=cfg.guidance).to(device)
    codes = codes.float()
    total_steps = cfg.autoencoder_steps + cfg.fit_steps

    def loss() -> torch.Tensor:
        z = codes[torch.randint(n, (min(cfg.batch_size, n),), generator=generator)].to(device)
        latent = prior.encoder(z)
        # The spread is measured on the batch and held constant: the encoder cannot escape the
        # noise by growing its latents.
        spread = latent.detach().std(0, keepdim=True).clamp_min(1e-6)
        # prior.latent_noise: the decoder learns to map a neighbourhood of each latent to nearby
        # codes, so that the flow's imperfect latents still decode onto the code surface.
        noisy = latent + cfg.latent_noise * spread * torch.randn(latent.shape, generator=generator).to(device)
        return ((prior.decoder(noisy) - z).square() * weights).mean()

    prior.train()
    autoencoder_taken, autoencoder_precision = optimise(
        [*prior.encoder.parameters(), *prior.decoder.parameters()], loss, cfg, cfg.autoencoder_steps,
        stage_seconds(cfg, cfg.autoencoder_steps, total_steps), progress, "fitting the prior's autoencoder")
    prior.eval()
    with torch.no_grad():
        latents = torch.cat([prior.encoder(chunk.to(device)) for chunk in codes.split(4096)])
        prior.latent_mean.copy_(latents.mean(0))
        prior.latent_std.copy_(latents.std(0).clamp_min(1e-6))
        state = ((latents - prior.latent_mean) / prior.latent_std).cpu()
    flow_taken, flow_precision = train_velocity(prior.velocity, state, cfg, generator, device, progress,
                                                "fitting the prior's flow", stage_seconds(cfg, cfg.fit_steps, total_steps),
                                                guide=prior.guide)
    prior.steps_taken = {"autoencoder": autoencoder_taken, "flow": flow_taken}
    prior.step_precision = {"autoencoder": describe_precision(autoencoder_precision),
                           "flow": describe_precision(flow_precision)}
    return prior.cpu().eval()


def fit_prior(codes: torch.Tensor, cfg: PriorConfig, seed: int = 0, device: torch.device | str = "cpu",
              progress: bool = False, eigenvalues: torch.Tensor | None = None) -> CodePrior:
    """The prior of kind cfg.kind fitted on train codes (n, d); latent_flow also takes the
    whitening's eigenvalues (d,) when cfg.code_weighting > 0."""
    if codes.ndim != 2 or len(codes) < 2:
        raise ValueError(f"a prior is fitted on codes of shape (n >= 2, d), got {tuple(codes.shape)}")
    if cfg.kind not in PRIORS:
        raise ValueError(f"unknown prior kind {cfg.kind!r}; expected one of {', '.join(PRIOR_KINDS)}")
    return PRIORS[cfg.kind].fit(codes, cfg, seed, device, progress, eigenvalues)


def save_prior(prior: CodePrior, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """One safetensors file: the prior's tensors, and its kind and settings as metadata."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in prior.state_dict().items()}
    meta = {"kind": prior.kind, "settings": prior.settings(), **(extra or {})}
    with atomic_path(path) as tmp:
        save_file(tensors or {"_empty": torch.zeros(0)}, str(tmp), metadata={"scatgen_prior": json.dumps(meta)})
    return path


def load_prior(path: str | Path) -> CodePrior:
    """A prior written by save_prior; a corrupt or foreign file is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prior file '{path}' does not exist; fit one with `sample.py fit-prior RUN`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["scatgen_prior"])
            tensors = {k: f.get_tensor(k) for k in f.keys() if k != "_empty"}
        kind, settings = meta["kind"], meta["settings"]
        prior = PRIORS[kind].cls(**settings)
        prior.load_state_dict(tensors)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as e:
        raise ValueError(f"prior file '{path}' is unreadable or corrupt ({type(e).__name__}: {e}); "
                         f"refit it with `sample.py fit-prior RUN`") from None
    return prior.eval()


def _fit_normal(codes: torch.Tensor, cfg: PriorConfig, *_: Any) -> NormalPrior:
    return NormalPrior(codes.shape[1])


def _fit_gmm(codes: torch.Tensor, cfg: PriorConfig, seed: int, device: Any, progress: bool,
             eigenvalues: Any) -> GaussianMixturePrior:
    return fit_gmm(codes, cfg.components, cfg.covariance, seed=seed, progress=progress,
                   dims=min(cfg.dims, codes.shape[1]))


def _fit_flow(codes: torch.Tensor, cfg: PriorConfig, seed: int, device: torch.device | str, progress: bool,
              eigenvalues: Any) -> FlowPrior:
    return fit_flow(codes, cfg, seed=seed, device=device, progress=progress)


@dataclass(frozen=True)
class PriorKind:
    cls: type[CodePrior]
    fit: Callable[..., CodePrior]  # (codes, cfg, seed, device, progress, eigenvalues) → a fitted prior


# The one list of prior kinds: config validation, the commands' choices, fitting and loading read it.
PRIORS: dict[str, PriorKind] = {
    "normal": PriorKind(NormalPrior, _fit_normal),
    "gmm": PriorKind(GaussianMixturePrior, _fit_gmm),
    "flow": PriorKind(FlowPrior, _fit_flow),
    "latent_flow": PriorKind(LatentFlowPrior, fit_latent_flow),
}
PRIOR_KINDS = tuple(PRIORS)
