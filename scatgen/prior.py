"""codes → prior: a density on the whitened codes, fitted after training, to draw codes from.

The whitening makes the codes white (identity covariance), not Gaussian. For data on a
low-dimensional manifold, such as polygons, most of N(0, I) lies off it, and G maps those
codes to blobs. A density fitted ex post to the train codes keeps samples on the manifold.

    normal   z ~ N(0, I), the paper's choice; nothing to fit
    gmm      a Gaussian mixture fitted by EM (the ex-post density of RAE, Ghosh et al. 2020)
    flow     flow matching (Lipman et al. 2023): an MLP velocity field v(z, t) carries
             N(0, I) at t = 0 to the codes at t = 1 along straight paths
             z_t = (1 − t) ε + t z; sampling integrates dz/dt = v with Heun's method

gmm and flow model the `dims` leading components (largest eigenvalues of the whitening)
and draw the rest from N(0, I): G's output hardly depends on the trailing components
(on polygons, replacing all but the leading 64 of 512 by noise leaves the decoded image
nearly unchanged), and a density in 64 dimensions is learnt from 10k codes where one in
512 is not. `temperature` scales the noise a prior starts from. A prior is saved as safetensors
with its settings as JSON metadata; nothing is pickled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from scatgen.config import PriorConfig
from scatgen.utils import atomic_path, progress_bar

PRIOR_KINDS = ("normal", "gmm", "flow")


class CodePrior(nn.Module):
    """A distribution over codes (d,) that can be sampled and saved."""

    kind = ""

    def __init__(self, d: int, dims: int = 0) -> None:
        super().__init__()
        if not 0 <= dims <= d:
            raise ValueError(f"prior.dims={dims} must be between 0 (all) and the code size d={d}")
        self.d = d
        self.modelled = dims or d  # the leading components this prior models; the rest are N(0, I)

    def settings(self) -> dict[str, Any]:
        """JSON-serialisable arguments that rebuild the module (with its tensors)."""
        return {"d": self.d, "dims": self.modelled}

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, temperature: float = 1.0) -> torch.Tensor:
        """n codes (n, d), a pure function of (seed, temperature) on CPU."""
        if n < 1:
            raise ValueError(f"the number of samples must be >= 1, got {n}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        generator = torch.Generator().manual_seed(seed)
        rest = temperature * torch.randn(n, self.d - self.modelled, generator=generator)
        return torch.cat([self._sample(n, generator, temperature), rest], dim=1)

    def _sample(self, n: int, generator: torch.Generator, temperature: float) -> torch.Tensor:
        """n draws of the modelled components (n, modelled)."""
        raise NotImplementedError


class NormalPrior(CodePrior):
    """z ~ N(0, T² I)."""

    kind = "normal"

    def _sample(self, n: int, generator: torch.Generator, temperature: float) -> torch.Tensor:
        return temperature * torch.randn(n, self.modelled, generator=generator)


class GaussianMixturePrior(CodePrior):
    """Σ_k π_k N(m_k, C_k), with C_k = A_k A_kᵀ (full) or diagonal."""

    kind = "gmm"

    def __init__(self, d: int, components: int, covariance: str = "full", dims: int = 0) -> None:
        super().__init__(d, dims)
        self.covariance = covariance
        d = self.modelled
        self.register_buffer("weights", torch.full((components,), 1.0 / components))
        self.register_buffer("means", torch.zeros(components, d))
        # A_k for full covariances, the standard deviations for diagonal ones.
        self.register_buffer("scales", torch.eye(d).repeat(components, 1, 1) if covariance == "full"
                             else torch.ones(components, d))

    def settings(self) -> dict[str, Any]:
        return {"d": self.d, "dims": self.modelled, "components": len(self.weights), "covariance": self.covariance}

    def _sample(self, n: int, generator: torch.Generator, temperature: float) -> torch.Tensor:
        which = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)
        eps = temperature * torch.randn(n, self.modelled, generator=generator)
        scales = self.scales.cpu()[which]
        offsets = torch.einsum("nij,nj->ni", scales, eps) if self.covariance == "full" else scales * eps
        return self.means.cpu()[which] + offsets


def fit_gmm(codes: torch.Tensor, components: int = 10, covariance: str = "full", iterations: int = 100,
            reg: float = 1e-3, seed: int = 0, progress: bool = False, dims: int = 0) -> GaussianMixturePrior:
    """EM on the `dims` leading components of codes (n, d) (0: all) in float64; k-means++
    seeding; `reg` is added to every covariance's diagonal."""
    prior = GaussianMixturePrior(codes.shape[1], components, covariance, dims)
    x = codes[:, :prior.modelled].double()
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


class VelocityField(nn.Module):
    """v(z, t): (B, d), (B,) → (B, d); a residual MLP with the time features at its input."""

    def __init__(self, d: int, width: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d + 64, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
            for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, d))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.inp(torch.cat([z, time_features(t)], dim=1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class FlowPrior(CodePrior):
    """Codes from noise by integrating a learned velocity field from t = 0 to 1."""

    kind = "flow"

    def __init__(self, d: int, width: int = 512, depth: int = 3, sample_steps: int = 32, dims: int = 0) -> None:
        super().__init__(d, dims)
        self.width, self.depth, self.sample_steps = width, depth, sample_steps
        self.velocity = VelocityField(self.modelled, width, depth)

    def settings(self) -> dict[str, Any]:
        return {"d": self.d, "dims": self.modelled, "width": self.width, "depth": self.depth,
                "sample_steps": self.sample_steps}

    def _sample(self, n: int, generator: torch.Generator, temperature: float) -> torch.Tensor:
        device = next(self.parameters()).device
        z = (temperature * torch.randn(n, self.modelled, generator=generator)).to(device)
        self.velocity.eval()
        dt = 1.0 / self.sample_steps
        for i in range(self.sample_steps):
            t = torch.full((n,), i * dt, device=device)
            v = self.velocity(z, t)
            guess = z + dt * v
            z = z + 0.5 * dt * (v + self.velocity(guess, t + dt))
        return z.cpu()


def fit_flow(codes: torch.Tensor, cfg: PriorConfig, seed: int = 0, device: torch.device | str = "cpu",
             progress: bool = False) -> FlowPrior:
    """Conditional flow matching on the cfg.dims leading components of codes (n, d): regress
    v(z_t, t) on z − ε along z_t = (1 − t) ε + t z."""
    n, d = codes.shape
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prior = FlowPrior(d, cfg.width, cfg.depth, cfg.sample_steps, min(cfg.dims, d)).to(device)
    codes = codes[:, :prior.modelled]
    opt = torch.optim.AdamW(prior.velocity.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / cfg.fit_steps)))
    codes = codes.float()
    prior.velocity.train()
    bar = progress_bar(range(cfg.fit_steps), desc="fitting flow prior", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(n, (min(cfg.batch_size, n),), generator=generator)
        z1 = codes[idx]
        z0 = torch.randn(z1.shape, generator=generator)
        t = torch.rand(len(z1), generator=generator)
        zt = (1 - t[:, None]) * z0 + t[:, None] * z1
        loss = (prior.velocity(zt.to(device), t.to(device)) - (z1 - z0).to(device)).square().mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the flow prior's loss became {loss.item()}; lower prior.lr (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    prior.velocity.eval()
    return prior.cpu()


def fit_prior(codes: torch.Tensor, cfg: PriorConfig, seed: int = 0, device: torch.device | str = "cpu",
              progress: bool = False) -> CodePrior:
    """The prior of kind cfg.kind fitted on train codes (n, d)."""
    if codes.ndim != 2 or len(codes) < 2:
        raise ValueError(f"a prior is fitted on codes of shape (n >= 2, d), got {tuple(codes.shape)}")
    if cfg.kind == "normal":
        return NormalPrior(codes.shape[1])
    if cfg.kind == "gmm":
        return fit_gmm(codes, cfg.components, cfg.covariance, seed=seed, progress=progress,
                       dims=min(cfg.dims, codes.shape[1]))
    if cfg.kind == "flow":
        return fit_flow(codes, cfg, seed=seed, device=device, progress=progress)
    raise ValueError(f"unknown prior kind {cfg.kind!r}; expected one of {', '.join(PRIOR_KINDS)}")


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
        cls = {"normal": NormalPrior, "gmm": GaussianMixturePrior, "flow": FlowPrior}[kind]
        prior = cls(**settings)
        prior.load_state_dict(tensors)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as e:
        raise ValueError(f"prior file '{path}' is unreadable or corrupt ({type(e).__name__}: {e}); "
                         f"refit it with `sample.py fit-prior RUN`") from None
    return prior.eval()
