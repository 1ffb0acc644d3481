"""Evaluation metrics as functions on tensors.

SSIM, FID and KID come from torchmetrics, a maintained library; what no library does
the same way stays here: PSNR per image, code statistics, precision/recall on k-NN
manifolds and the memorisation check.

Contents
--------
* Reconstruction quality: :func:`psnr`, :func:`ssim` (per image); :func:`finite_mean`
  and :class:`RunningMean` average per-image values over a set or a whole split.
* Whitened-code diagnostics: :func:`code_statistics`.
* Sample quality: FID (:func:`fid_from_features`) and KID (:func:`kernel_inception_distance`)
  on features from :mod:`scatgen.inception` or any other feature network.
* Sample fidelity and coverage: :func:`precision_recall` (k-NN manifolds).
* Memorisation: :func:`nearest_neighbour_distances`, :func:`memorisation_report`.

Conventions: images are float tensors ``(B, 3, H, W)`` in ``[0, 1]`` unless stated
otherwise. Nothing here reads or writes files. torchmetrics is imported on first use: it
pulls in torchvision, seconds that training, which only needs PSNR, should not pay.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import numpy as np
import torch

__all__ = [
    "psnr",
    "ssim",
    "finite_values",
    "finite_mean",
    "RunningMean",
    "code_statistics",
    "fid_from_features",
    "kernel_inception_distance",
    "nearest_neighbour_distances",
    "memorisation_report",
    "precision_recall",
]


# ---------------------------------------------------------------------------------------
# Reconstruction metrics
# ---------------------------------------------------------------------------------------


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(x.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image peak signal-to-noise ratio in dB.

    ``PSNR_b = 10 log10(data_range**2 / MSE_b)`` with ``MSE_b`` the mean squared error
    over all channels and pixels of image ``b``.

    Args:
        x, y: ``(B, C, H, W)`` images on the same scale (``[0, data_range]``).
        data_range: peak-to-peak value range of the images.

    Returns:
        ``(B,)`` float64 tensor. Identical images (MSE = 0) give ``+inf``; callers should
        either average the finite values (:func:`finite_mean`, ``RunningMean(skip_nonfinite=True)``)
        or report ``inf``.
    """
    _check_pair(x, y)
    # float64: the MSE of near-identical float32 images loses digits otherwise.
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)
    # mse == 0 -> range²/0 = inf -> log10(inf) = inf, no special-casing needed.
    return 10.0 * torch.log10(data_range**2 / mse)


SSIM_WINDOW = 11  # taps of torchmetrics' Gaussian window for sigma = 1.5: 2 * int(3.5 sigma + 0.5) + 1


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image structural similarity (Wang et al. 2004), averaged over channels and positions.

    torchmetrics computes the SSIM map with an 11 x 11 Gaussian window (std 1.5), C1 = (0.01 L)²,
    C2 = (0.03 L)², L = data_range::

        SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x² + mu_y² + C1)(s_xx + s_yy + C2))

    The map is averaged over the positions whose window lies inside the image, as
    ``skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False)``
    and ``pytorch_msssim`` do, and as scatgen always reported: torchmetrics' own mean also
    covers the reflect-padded border, which for 32² images is half the positions. Images of
    at most 10 pixels a side have no such position and get torchmetrics' mean.

    Args:
        x, y: ``(B, C, H, W)`` images in ``[0, data_range]``.

    Returns:
        ``(B,)`` float64 tensor; 1 for identical images.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(x, y)
    if min(x.shape[-2:]) <= SSIM_WINDOW // 2:
        raise ValueError(f"SSIM needs images of more than {SSIM_WINDOW // 2} pixels a side, got {tuple(x.shape)}")
    whole, full = structural_similarity_index_measure(
        x.double(), y.double(), gaussian_kernel=True, sigma=1.5, kernel_size=SSIM_WINDOW, data_range=data_range,
        k1=0.01, k2=0.03, reduction="none", return_full_image=True)
    pad = SSIM_WINDOW // 2
    if min(x.shape[-2:]) < SSIM_WINDOW:
        return whole
    return full[..., pad:-pad, pad:-pad].flatten(1).mean(dim=1)


def _flat_double(values: torch.Tensor | np.ndarray | float | Iterable[float]) -> torch.Tensor:
    v = torch.as_tensor(values if not isinstance(values, torch.Tensor) else values.detach())
    return v.reshape(-1).double()


def finite_values(values: torch.Tensor | np.ndarray | float | Iterable[float]) -> torch.Tensor:
    """The finite ones among `values`, as a flat float64 tensor on their device.

    One image reconstructed exactly has PSNR = inf, which would make any mean inf: the means
    of per-image PSNR leave such values out (and may count them, as "perfect").
    """
    v = _flat_double(values)
    return v[torch.isfinite(v)]


def finite_mean(values: torch.Tensor | np.ndarray | float | Iterable[float]) -> float:
    """Mean of the finite `values` (e.g. per-image PSNR, inf for exact copies); NaN if none is finite."""
    return finite_values(values).mean().item()


class RunningMean:
    """Exact mean of per-item values accumulated over uneven batches.

    ``mean = sum(all values) / count(all values)`` — *not* the mean of per-batch means,
    which over-weights the items of a short last batch.

    With ``skip_nonfinite=True`` the values :func:`finite_values` leaves out (e.g. PSNR = inf
    for a perfect reconstruction) are not in the sum but counted in :attr:`n_skipped`.
    """

    def __init__(self, skip_nonfinite: bool = False) -> None:
        self.skip_nonfinite = skip_nonfinite
        self.reset()

    def reset(self) -> None:
        self.total = 0.0
        self.count = 0
        self.n_skipped = 0

    def update(self, values: torch.Tensor | np.ndarray | float | Iterable[float]) -> None:
        """Add per-item values (any shape; each element is one item)."""
        v = _flat_double(values).cpu()
        if self.skip_nonfinite:
            finite = finite_values(v)
            self.n_skipped += v.numel() - finite.numel()
            v = finite
        self.total += float(v.sum())
        self.count += int(v.numel())

    def compute(self) -> float:
        """The mean so far; NaN if nothing was added."""
        return self.total / self.count if self.count else float("nan")

    @property
    def mean(self) -> float:
        return self.compute()

    def __repr__(self) -> str:
        return f"RunningMean(mean={self.compute():.6g}, count={self.count}, n_skipped={self.n_skipped})"


# ---------------------------------------------------------------------------------------
# Whitened-code statistics
# ---------------------------------------------------------------------------------------


def code_statistics(codes: torch.Tensor) -> dict[str, float]:
    """How close a set of codes is to a standard normal N(0, I), in float64.

    Args:
        codes: ``(n, d)`` samples, ``n >= 2``.

    Returns a dict of Python floats:
        * ``mean_norm``: ``||mu||_2`` with ``mu`` the mean over samples — the raw,
          *unnormalised* Euclidean norm (it grows like ``sqrt(d)`` for a fixed per-component
          offset). ``mean_rms`` = ``||mu||_2 / sqrt(d)`` is given alongside.
        * ``cov_rel_frobenius``: ``||C - I||_F / ||I||_F = ||C - I||_F / sqrt(d)`` with
          ``C`` the unbiased sample covariance (divisor ``n - 1``). For ``C = s² I`` it is
          ``|s² - 1|``.
        * ``excess_kurtosis``: mean over components of ``E[(z - mu)^4] / sigma^4 - 3``
          (population moments, divisor ``n``); 0 for a Gaussian, 3 for Laplace,
          -1.2 for uniform.
        * ``n``, ``d``.
    """
    if codes.ndim != 2 or codes.shape[0] < 2:
        raise ValueError(f"expected (n, d) codes with n >= 2, got shape {tuple(codes.shape)}")
    z = codes.detach().double()
    n, d = z.shape
    mu = z.mean(dim=0)
    zc = z - mu
    cov = zc.T @ zc / (n - 1)
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    var = zc.pow(2).mean(dim=0)
    m4 = zc.pow(4).mean(dim=0)
    kurt = m4 / var.pow(2) - 3.0
    return {
        "mean_norm": float(mu.norm()),
        "mean_rms": float(mu.norm() / math.sqrt(d)),
        "cov_rel_frobenius": float(torch.linalg.matrix_norm(cov - eye) / math.sqrt(d)),
        "excess_kurtosis": float(kurt.mean()),
        "n": int(n),
        "d": int(d),
    }


# ---------------------------------------------------------------------------------------
# FID / KID
# ---------------------------------------------------------------------------------------


class _GivenFeatures(torch.nn.Module):
    """torchmetrics' `feature` extractor for features computed already: one Inception pass then
    serves FID, KID and precision/recall."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # read by FrechetInceptionDistance instead of a dummy forward

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check_features(f1: torch.Tensor, f2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f1, f2 = (torch.as_tensor(f).detach().cpu().double() for f in (f1, f2))
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"expected (n1, k) and (n2, k) features, got {tuple(f1.shape)} and {tuple(f2.shape)}")
    if min(len(f1), len(f2)) < 2:
        raise ValueError(f"FID and KID need at least 2 samples in each set, got {len(f1)} and {len(f2)}")
    return f1, f2


def fid_from_features(f1: torch.Tensor | np.ndarray, f2: torch.Tensor | np.ndarray) -> float:
    """FID between two ``(n, k)`` feature sets, by torchmetrics' FrechetInceptionDistance:

    ``d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` with unbiased covariances (divisor
    ``n - 1``), in float64.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    f1, f2 = _check_features(f1, f2)
    metric = FrechetInceptionDistance(feature=_GivenFeatures(f1.shape[1]))
    metric.update(f1, real=True)
    metric.update(f2, real=False)
    return float(metric.compute())


def kernel_inception_distance(
    f1: torch.Tensor | np.ndarray,
    f2: torch.Tensor | np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018) by torchmetrics' KernelInceptionDistance: unbiased MMD² with
    the cubic kernel ``k(x, y) = (x·y / k + 1)^3``, ``k`` the feature dimension, averaged over
    ``subsets`` random subsets of ``m = min(subset_size, n1, n2)`` rows of each set (without
    replacement; drawn from torch's generator seeded with `seed`, the global one untouched).

    Returns ``(mean, std)`` over subsets (``std`` with ``ddof=0``). Unbiased, so it can be
    slightly negative when the two sets match.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    f1, f2 = _check_features(f1, f2)
    with warnings.catch_warnings():
        # Its warning that all features are kept in memory: ours are, by construction.
        warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
        metric = KernelInceptionDistance(feature=_GivenFeatures(f1.shape[1]), subsets=subsets,
                                         subset_size=min(subset_size, len(f1), len(f2)))
    metric.update(f1, real=True)
    metric.update(f2, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


# ---------------------------------------------------------------------------------------
# Precision and recall
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def _knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row: (n, D) → (n,)."""
    d = torch.cdist(features, features)
    return d.kthvalue(k + 1, dim=1).values  # the smallest is the row itself, at 0


@torch.no_grad()
def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points, each ball reaching that
    point's k-th nearest neighbour within the set. precision = share of fake points inside
    the real manifold (how many samples look real); recall = share of real points inside
    the fake manifold (how much of the data the samples cover). Features (n, D), (m, D).
    """
    if real_features.ndim != 2 or fake_features.ndim != 2 or real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(f"expected features (n, D) and (m, D), got {tuple(real_features.shape)} and "
                         f"{tuple(fake_features.shape)}")
    if min(len(real_features), len(fake_features)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points in each set")
    real, fake = real_features.double(), fake_features.double()
    real_radii, fake_radii = _knn_radii(real, k), _knn_radii(fake, k)
    cross = torch.cdist(fake, real)  # (m, n)
    precision = (cross <= real_radii[None, :]).any(dim=1).double().mean().item()
    recall = (cross.T <= fake_radii[None, :]).any(dim=1).double().mean().item()
    return {"precision": precision, "recall": recall, "k": k}


# ---------------------------------------------------------------------------------------
# Memorisation
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def nearest_neighbour_distances(
    queries: torch.Tensor, reference: torch.Tensor, batch: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 nearest neighbour of each query among the references, in flattened pixel space.

    Args:
        queries: ``(m, ...)``, reference: ``(n, ...)``; each row is flattened to ``D`` values.
        batch: chunk size along both ``m`` and ``n``; memory is ``O(batch² + batch·D)``.

    Returns:
        ``dist (m,)`` float64 and ``index (m,)`` int64 into ``reference``.

    Search uses ``||a||² + ||b||² - 2 a·b`` in float64 (clamped at 0); the winning distance
    is then recomputed directly as ``||a - b||`` so exact copies give exactly 0.
    """
    q = queries.detach().reshape(queries.shape[0], -1).double()
    r = reference.detach().reshape(reference.shape[0], -1).to(q.device).double()
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"dimension mismatch: queries D={q.shape[1]}, reference D={r.shape[1]}")
    if r.shape[0] == 0:
        raise ValueError("empty reference set")
    r_sq = r.pow(2).sum(dim=1)
    best_d2 = torch.empty(q.shape[0], dtype=torch.float64, device=q.device)
    best_i = torch.empty(q.shape[0], dtype=torch.long, device=q.device)
    for qs in range(0, q.shape[0], batch):
        qb = q[qs : qs + batch]
        qb_sq = qb.pow(2).sum(dim=1, keepdim=True)
        run_d = torch.full((qb.shape[0],), math.inf, dtype=torch.float64, device=q.device)
        run_i = torch.zeros(qb.shape[0], dtype=torch.long, device=q.device)
        for rs in range(0, r.shape[0], batch):
            rb = r[rs : rs + batch]
            d2 = (qb_sq + r_sq[rs : rs + batch] - 2.0 * qb @ rb.T).clamp_min_(0.0)
            d, i = d2.min(dim=1)
            better = d < run_d
            run_d = torch.where(better, d, run_d)
            run_i = torch.where(better, i + rs, run_i)
        best_d2[qs : qs + batch] = run_d
        best_i[qs : qs + batch] = run_i
    # Exact recomputation for the chosen neighbours (removes expansion round-off).
    dist = (q - r[best_i]).norm(dim=1)
    return dist, best_i


def memorisation_report(
    sample_images: torch.Tensor,
    test_images: torch.Tensor,
    train_images: torch.Tensor,
    batch: int = 1024,
    copy_quantile: float = 0.01,
    n_closest: int = 16,
) -> dict:
    """Compare how close generated samples and held-out real images are to the training set.

    ``d_s[i]`` = pixel-space L2 distance from sample ``i`` to its nearest training image;
    ``d_t[j]`` = same for held-out test image ``j`` (the baseline: how close a *new* real
    image from the same distribution typically is to the training set).

    Interpretation: ``ratio_median = median(d_s) / median(d_t)`` near 1 means samples are
    as far from the training set as unseen real images are (no sign of memorisation);
    well below 1 means samples sit nearer the training set than held-out data do, i.e.
    memorisation; 0 means exact copies. ``frac_possible_copies`` is the fraction of
    samples closer to their nearest training image than the ``copy_quantile`` quantile
    of ``d_t`` (``copy_quantile=0`` -> the minimum); inspect ``closest_sample_indices``
    (with their ``closest_train_indices``) visually.

    Returns a dict of Python scalars/lists: ``sample_nn_median``, ``sample_nn_mean``,
    ``test_nn_median``, ``test_nn_mean``, ``ratio_median``, ``ratio_mean``,
    ``copy_threshold``, ``frac_possible_copies``, ``closest_sample_indices``,
    ``closest_sample_distances``, ``closest_train_indices``, ``n_samples``, ``n_test``,
    ``n_train``.
    """
    d_s, i_s = nearest_neighbour_distances(sample_images, train_images, batch=batch)
    d_t, _ = nearest_neighbour_distances(test_images, train_images, batch=batch)
    d_s, i_s, d_t = d_s.cpu(), i_s.cpu(), d_t.cpu()
    s_med, t_med = float(d_s.median()), float(d_t.median())
    s_mean, t_mean = float(d_s.mean()), float(d_t.mean())
    threshold = float(torch.quantile(d_t, copy_quantile)) if copy_quantile > 0 else float(d_t.min())
    order = torch.argsort(d_s)[:n_closest]

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else (math.nan if a == 0 else math.inf)

    return {
        "sample_nn_median": s_med,
        "sample_nn_mean": s_mean,
        "test_nn_median": t_med,
        "test_nn_mean": t_mean,
        "ratio_median": ratio(s_med, t_med),
        "ratio_mean": ratio(s_mean, t_mean),
        "copy_threshold": threshold,
        "frac_possible_copies": float((d_s < threshold).double().mean()),
        "closest_sample_indices": order.tolist(),
        "closest_sample_distances": d_s[order].tolist(),
        "closest_train_indices": i_s[order].tolist(),
        "n_samples": int(d_s.numel()),
        "n_test": int(d_t.numel()),
        "n_train": int(train_images.shape[0]),
    }
