"""generator → refinement: gradient descent on the scattering mismatch, started at G's output.

G is a regression, so G(z) is close to a conditional mean, blurry wherever S_J leaves the
image undetermined. Refinement is Mallat's microcanonical step started from G's guess
instead of white noise: it moves x₀ = G(z) until S_J x matches a target.

    from an image x_t (all D coefficients known; E_m: the mean square of its order-m ones):
        E(x) = Σ_m (E_0 / E_m)^b ‖(S_J x − S_J x_t)_m‖²
    from a code z (only the d whitened coordinates known), with U, Λ, μ the whitening's:
        E(x) = Σ_k λ_k^(−α) (u_kᵀ(S_J x − μ) − λ_k^(1/2) z_k)²  +  β ‖(I − UUᵀ)(S_J x − S_J x₀)‖²

α = 0 compares PCA coordinates, α = 1 whitened ones. The β term ("anchor") holds the
D − d coefficients that the code does not fix where G put them; without it they drift into
streaks. The order weights ("balance" b) keep the minimiser, x_t, and only change the
conditioning: unweighted, the order-0 coefficients, hundreds of times larger, set the curvature,
and the mid frequencies that orders 1 and 2 carry converge slowly. That holds from a start with
structure, such as a trained G's output; from a structureless one (grey, noise, an untrained G)
the plain objective converges faster, and b = 0 is the better choice. Every image has its own
objective and, with L-BFGS, its own line search, so a batch is refined at once and no result
depends on its batch. Pixels end in [−1, 1].

Towards a code, refine.tv (an image's code) or refine.sample_tv (a drawn one) adds τ·TV(x), a
colour total variation (`total_variation`): where the d components leave an image undetermined,
it prefers flat regions whose channels jump together over streaks and colour fringes.

A drawn code is no image's code, so its target need not be held fixed: with a `Surface` (a
latent_flow prior's decoder and refine.latent_spread σ > 0), the target is z + D(u) − D(u₀), with
u₀ the prior's latent of z and D its decoder, and u is optimised with x at a cost ‖u − u₀‖²/σ².
The code then moves along the prior's surface, through z, towards one that a clean image can
realise; at u = u₀ the target is z itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from scatgen.config import RefineConfig, check_refine
from scatgen.encoder import Encoder
from scatgen.filter_bank import channel_orders
from scatgen.prior import CodePrior
from scatgen.scattering import Scattering
from scatgen.speed import work_done
from scatgen.utils import progress_bar
from scatgen.whitening import Whitening

PROGRESS_DELAY_S = 5.0  # refinement that takes longer than this shows a progress bar


def _batches(*tensors: torch.Tensor, size: int):
    """Batches of `size` items of each tensor, with a progress bar once the work takes a while."""
    pairs = list(zip(*(t.split(size) for t in tensors)))
    return progress_bar(pairs, desc="refining", unit="batch", leave=False, delay=PROGRESS_DELAY_S)

# (coeffs of the images idx (n, D), idx (n,) positions in the batch or None for all, and the
# shift (n, d) of their target codes or None) → energy (n,)
Objective = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


@dataclass
class Surface:
    """A latent prior's surface through each drawn code z: z + D(u) − D(u₀), for latents u.

    states (B, m) are u₀; decode maps latents (n, m) to codes (n, d), differentiably; spread σ
    prices a move as ‖u − u₀‖²/σ². `descend` leaves the latents it ended at in `moved`."""

    states: torch.Tensor
    decode: Callable[[torch.Tensor], torch.Tensor]
    spread: float
    moved: torch.Tensor | None = None

    def __post_init__(self) -> None:
        with torch.no_grad():
            self.base = self.decode(self.states)

    def shift(self, u: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """How far the targets of the images idx have moved, (n, d), at latents u (n, m)."""
        return self.decode(u) - _rows(self.base, idx)

    def cost(self, u: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return (u - _rows(self.states, idx)).square().sum(1) / self.spread**2


TV_EPSILON = 0.01  # smooths the TV's kink at a zero gradient, which L-BFGS's curvature pairs need


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Colour (vectorial) TV per image, (B, C, H, W) → (B,):

        TV(x) = Σ_pixels sqrt(Σ_c (∂_h x_c)² + (∂_w x_c)² + ε²) − ε

    with forward differences (0 past the last row and column). The channels share one gradient
    norm, so an edge costs less where all channels jump at the same pixel than where they jump at
    neighbouring ones: it removes colour fringes, which per-channel TV charges no more than a
    clean edge. Isotropic, so it does not favour axis-aligned edges."""
    dh = torch.nn.functional.pad(images[:, :, 1:] - images[:, :, :-1], (0, 0, 0, 1))
    dw = torch.nn.functional.pad(images[:, :, :, 1:] - images[:, :, :, :-1], (0, 1))
    norm = ((dh.square() + dw.square()).sum(1) + TV_EPSILON**2).sqrt() - TV_EPSILON
    return norm.flatten(1).sum(1)


def image_objective(target_coeffs: torch.Tensor, weights: torch.Tensor | None = None) -> Objective:
    """E(x) = Σ w (S_J x − S_J x_t)² for targets (B, D) and weights (B, D) (None: all 1)."""
    if weights is None:
        return lambda coeffs, idx=None, shift=None: (coeffs - _rows(target_coeffs, idx)).square().sum(1)
    return lambda coeffs, idx=None, shift=None: ((coeffs - _rows(target_coeffs, idx)).square()
                                                 * _rows(weights, idx)).sum(1)


def order_balance(scattering: Scattering, target_coeffs: torch.Tensor, balance: float) -> torch.Tensor | None:
    """Weights (B, D) of each image's coefficients: (E_0 / E_m)^balance for order m, with E_m the
    mean square of that image's own order-m target coefficients (so no image depends on its
    batch). None for balance 0. An order with no energy (a flat image) gets E_m = 10⁻⁶ E_0."""
    if balance == 0:
        return None
    K, (_, h, w) = scattering.K, scattering.out_shape
    C = target_coeffs.shape[1] // (K * h * w)
    orders = channel_orders(scattering.J, scattering.L).to(target_coeffs.device)
    per_channel = target_coeffs.reshape(len(target_coeffs), C, K, h * w).square()
    energy = torch.stack([per_channel[:, :, orders == m].mean((1, 2, 3)) for m in range(3)], 1)  # (B, 3)
    e0 = energy[:, :1]
    ratio = torch.where(e0 > 0, e0 / energy.clamp_min(1e-6 * e0), torch.ones_like(energy))
    weights = ratio.pow(balance)[:, orders]  # (B, K)
    return weights[:, None, :, None].expand(-1, C, -1, h * w).reshape(target_coeffs.shape)


def code_objective(whitening: Whitening, codes: torch.Tensor, start_coeffs: torch.Tensor,
                   weighting: float = 0.0, anchor: float = 1.0, dims: int | None = None) -> Objective:
    """E(x) for codes (B, d), with S_J x₀ = start_coeffs (B, D) (see the module docstring).

    Only the `dims` leading code components are targets (None: all d); the rest, like the
    D − d coefficients outside the code, are anchored to x₀'s. A prior that models the leading
    components alone fills the others with noise, which is no target for refinement. A shift
    (n, d) moves the codes of the images evaluated (a `Surface`)."""
    k = whitening.d if dims is None else dims
    U, lam, mu = whitening.basis[:, :k], whitening.eigenvalues[:k], whitening.mean
    weights = lam.pow(-weighting)
    target = whitening.coordinates(codes, k)
    start_centred = start_coeffs - mu
    start_residual = start_centred - (start_centred @ U) @ U.T

    def energy(coeffs: torch.Tensor, idx: torch.Tensor | None = None,
               shift: torch.Tensor | None = None) -> torch.Tensor:
        centred = coeffs - mu
        pca = centred @ U
        goal = _rows(target, idx) if shift is None else _rows(target, idx) + whitening.coordinates(shift, k)
        e = ((pca - goal).square() * weights).sum(1)
        if anchor > 0:
            residual = centred - pca @ U.T
            e = e + anchor * (residual - _rows(start_residual, idx)).square().sum(1)
        return e

    return energy


def _rows(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return t if idx is None else t[idx]


def _per_image(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (_per_image(a) * _per_image(b)).sum(1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def lbfgs(x: torch.Tensor, energy_and_grad: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
          evaluations: int, history: int = 10, armijo: float = 1e-4,
          on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """L-BFGS on every image of the batch separately (its own curvature pairs, line search and
    budget of evaluations), so that an image's result never depends on the others in its batch.

    x (B, ...) → x after at most `evaluations` calls of energy_and_grad per image, where
    energy_and_grad(x[idx], idx) → ((n,), (n, ...)) evaluates the images idx. Only the images
    still searching are evaluated: one that has taken its step waits, at no cost to its budget,
    while the others backtrack. Line search: Armijo backtracking from the unit step, halving; the
    first step is scaled by 1/‖g‖₁ (as torch.optim.LBFGS does), later ones by sᵀy/yᵀy.
    """
    f, g = energy_and_grad(x, torch.arange(len(x), device=x.device))
    calls = torch.ones(len(x), dtype=torch.long, device=x.device)
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s, y, 1/sᵀy or 0 where unusable)
    gamma = 1.0 / _per_image(g).abs().sum(1).clamp_min(1e-12)
    while (active := calls < evaluations).any():
        # Two-loop recursion: d = −H g with H the L-BFGS inverse-Hessian estimate of each image.
        q = g.clone()
        alphas = []
        for s, y, rho in reversed(pairs):
            a = rho * _dot(s, q)
            q -= _bcast(a, q) * y
            alphas.append(a)
        q *= _bcast(gamma.clamp_max(1.0) if not pairs else gamma, q)
        for (s, y, rho), a in zip(pairs, reversed(alphas)):
            q += _bcast(a - rho * _dot(y, q), q) * s
        d = -q
        slope = _dot(g, d)
        uphill = slope >= 0  # a bad curvature estimate: fall back to steepest descent
        if uphill.any():
            d = torch.where(_bcast(uphill, d), -g * _bcast(gamma, g), d)
            slope = _dot(g, d)
        step = torch.ones_like(f)
        accepted = torch.zeros_like(f, dtype=torch.bool)
        x_new, f_new, g_new = x.clone(), f.clone(), g.clone()
        searching = active
        while searching.any():
            idx = searching.nonzero().squeeze(1)
            trial = x[idx] + _bcast(step[idx], d[idx]) * d[idx]
            f_trial, g_trial = energy_and_grad(trial, idx)
            calls[idx] += 1
            ok = torch.isfinite(f_trial) & (f_trial <= f[idx] + armijo * step[idx] * slope[idx])
            took = idx[ok]
            x_new[took], f_new[took], g_new[took] = trial[ok], f_trial[ok], g_trial[ok]
            accepted[took] = True
            step[idx[~ok]] /= 2
            searching = active & ~accepted & (calls < evaluations)
            if on_step is not None:
                on_step(int(calls.max()), x_new)
        s, y = x_new - x, g_new - g
        sy, yy = _dot(s, y), _dot(y, y)
        usable = accepted & (sy > 1e-10 * yy.sqrt() * _dot(s, s).sqrt())
        pairs.append((s, y, torch.where(usable, 1.0 / sy.clamp_min(1e-30), torch.zeros_like(sy))))
        pairs = pairs[-history:]
        gamma = torch.where(usable, sy / yy.clamp_min(1e-30), gamma)
        x, f, g = x_new, f_new, g_new
    return x


def descend(scattering: Scattering, start: torch.Tensor, objective: Objective, cfg: RefineConfig,
            on_step: Callable[[int, torch.Tensor], None] | None = None,
            surface: Surface | None = None) -> torch.Tensor:
    """Minimise objective(S_J x) (+ tv · TV(x)) over x ∈ [−1, 1]^(3×N×N) from x = start (B, 3, N, N);
    with a `surface`, over x and the codes' latents u together (+ the surface's cost).

    `cfg.steps` counts gradient evaluations for both optimisers. on_step(i, x), if given,
    sees the images after i evaluations (benchmarks trace with it)."""
    def energy(x: torch.Tensor, u: torch.Tensor | None, idx: torch.Tensor | None = None) -> torch.Tensor:
        work_done(len(x))  # image evaluations: the thread governor's unit (scatgen.speed)
        coeffs = scattering(x).reshape(x.shape[0], -1)
        if surface is None:
            e = objective(coeffs, idx)
        else:
            e = objective(coeffs, idx, surface.shift(u, idx)) + surface.cost(u, idx)
        return e + cfg.tv * total_variation(x) if cfg.tv > 0 else e

    check_refine(cfg)
    x = start.detach().float().clone().clamp_(-1, 1)
    u = None if surface is None else surface.states.detach().float().clone()
    with torch.enable_grad():
        if cfg.optimizer == "adam":
            x.requires_grad_(True)
            params = [x] if u is None else [x, u.requires_grad_(True)]
            opt = torch.optim.Adam(params, lr=cfg.lr)
            for i in range(cfg.steps):
                opt.zero_grad(set_to_none=True)
                energy(x, u).sum().backward()  # images are independent: the sum's gradient is each one's
                opt.step()
                with torch.no_grad():
                    x.clamp_(-1, 1)
                if on_step is not None:
                    on_step(i + 1, x.detach())
            u = None if u is None else u.detach()
        else:  # lbfgs, on each image's pixels and latent as one vector
            pixels = x[0].numel()
            as_images = lambda v: v[:, :pixels].reshape(len(v), *x.shape[1:])  # noqa: E731

            def energy_and_grad(v: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                v = v.detach().requires_grad_(True)
                e = energy(as_images(v), v[:, pixels:], idx)
                (grad,) = torch.autograd.grad(e.sum(), v)
                return e.detach(), grad

            v = x.flatten(1) if u is None else torch.cat([x.flatten(1), u], 1)
            # Unconstrained, then clipped: the box is rarely active away from the start's edges.
            v = lbfgs(v, energy_and_grad, cfg.steps,
                      on_step=None if on_step is None else lambda i, v: on_step(i, as_images(v).clamp(-1, 1)))
            x = as_images(v).clamp_(-1, 1)
            u = None if u is None else v[:, pixels:]
    if surface is not None:
        surface.moved = u
    return x.detach()


def refine_reconstructions(scattering: Scattering, start: torch.Tensor, images: torch.Tensor,
                           cfg: RefineConfig) -> torch.Tensor:
    """Refine G(L S_J x_t) = start (B, 3, N, N) towards the full S_J x_t of images (B, 3, N, N):
    all D coefficients are known, so no whitening is involved, and no TV: the objective is
    determined, and TV only pulls the result away from x_t (cfg.tv is for codes)."""
    check_refine(cfg)
    if cfg.steps == 0:
        return start
    cfg = replace(cfg, tv=0.0)
    device = next(iter(scattering.buffers()), torch.empty(0)).device
    out = []
    for x0, xt in _batches(start, images, size=cfg.batch_size):
        x0, xt = x0.to(device), xt.to(device)
        with torch.no_grad():
            target = scattering(xt.float()).reshape(len(xt), -1)
        weights = order_balance(scattering, target, cfg.balance)
        out.append(descend(scattering, x0, image_objective(target, weights), cfg).cpu())
    return torch.cat(out)


def refine_decodings(encoder: Encoder, start: torch.Tensor, codes: torch.Tensor, cfg: RefineConfig,
                     dims: int | None = None, prior: CodePrior | None = None) -> torch.Tensor:
    """Refine G(z) = start (B, 3, N, N) so that L S_J x matches the codes z (B, d), or their
    `dims` leading components. With a prior whose codes are a function of a latent (latent_flow)
    and cfg.latent_spread > 0, each code may move along the prior's surface (`Surface`)."""
    check_refine(cfg)
    if cfg.steps == 0:
        return start
    maps = prior.latent_maps() if prior is not None and cfg.latent_spread > 0 else None
    at = None if maps is None else next(prior.parameters()).device  # where the prior's decoder runs
    out = []
    for x0, z in _batches(start, codes, size=cfg.batch_size):
        x0, z = x0.to(encoder.device), z.to(encoder.device)
        with torch.no_grad():
            start_coeffs = encoder.coefficients(x0.float())
        objective = code_objective(encoder.whitening, z, start_coeffs, cfg.weighting, cfg.anchor, dims)
        surface = None
        if maps is not None:
            to_latent, to_codes = maps
            with torch.no_grad():
                states = to_latent(z.to(at)).to(z.device)
            surface = Surface(states, lambda u: to_codes(u.to(at)).to(u.device), cfg.latent_spread)
        out.append(descend(encoder.scattering, x0, objective, cfg, surface=surface).cpu())
    return torch.cat(out)
