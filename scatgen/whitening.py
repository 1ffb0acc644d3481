"""coeffs → codes: a learned linear whitening z = Λ^{-1/2} Uᵀ (s − μ).

s = S_J x flattened to D numbers, μ its train mean, U (D, d) the d leading principal
directions of its covariance and Λ their eigenvalues. The pseudo-inverse is
s ≈ μ + U Λ^{1/2} z, so inverse∘forward is the orthogonal projection onto μ + span(U).

The fit streams over the data with memory independent of the number of images:
- `exact`: accumulates the D×D second moment (small D only).
- `randomized`: range finding on C Ω = Σ xᵢ(xᵢᵀ Ω) with power iterations and a final
  Rayleigh–Ritz step (Halko, Martinsson & Tropp 2011); never forms a D×D matrix.
Under torch.distributed the sums are all-reduced, so every rank fits the same L.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from scatgen.utils import atomic_path, progress_bar

EXACT_MAX_DIM = 2048  # above this, `auto` uses the randomized fit: eigh costs O(D³)


class Whitening(nn.Module):
    """coeffs (B, D) or (B, C, h, w) → codes (B, d), and back."""

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, eigenvalues: torch.Tensor,
                 metadata: dict[str, Any] | None = None) -> None:
        super().__init__()
        D, d = basis.shape
        if mean.shape != (D,) or eigenvalues.shape != (d,):
            raise ValueError(f"inconsistent whitening: mean {tuple(mean.shape)}, basis {tuple(basis.shape)}, "
                             f"eigenvalues {tuple(eigenvalues.shape)}")
        self.register_buffer("mean", mean.float().contiguous())
        self.register_buffer("basis", basis.float().contiguous())
        self.register_buffer("eigenvalues", eigenvalues.float().contiguous())
        self.metadata = dict(metadata or {})

    @property
    def D(self) -> int:
        """The number of scattering coefficients."""
        return self.basis.shape[0]

    @property
    def d(self) -> int:
        """The code size."""
        return self.basis.shape[1]

    def forward(self, coeffs: torch.Tensor) -> torch.Tensor:
        coeffs = coeffs.reshape(coeffs.shape[0], -1).float()
        if coeffs.shape[1] != self.D:
            raise ValueError(f"expected coeffs with D={self.D} values, got {coeffs.shape[1]}")
        return ((coeffs - self.mean) @ self.basis) * self.eigenvalues.rsqrt()

    def coordinates(self, codes: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """The PCA coordinates Λ^{1/2} z that codes (B, d) stand for, or their k leading ones:
        the coefficients are μ + U Λ^{1/2} z plus what the code does not fix."""
        if codes.ndim != 2 or codes.shape[1] != self.d:
            raise ValueError(f"expected codes of shape (B, {self.d}), got {tuple(codes.shape)}")
        k = self.d if k is None else k
        return codes[:, :k].float() * self.eigenvalues[:k].sqrt()

    def fingerprint(self) -> str:
        """A short hash of the fitted tensors: it keys the code cache."""
        h = hashlib.sha256()
        for t in (self.mean, self.basis, self.eigenvalues):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        meta = dict(self.metadata, d=self.d, D=self.D, eigenvalues=self.eigenvalues.tolist(),
                    fingerprint=self.fingerprint())
        tensors = {"mean": self.mean.cpu(), "basis": self.basis.cpu(), "eigenvalues": self.eigenvalues.cpu()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"scatgen_whitening": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> "Whitening":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"whitening file '{path}' does not exist")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("scatgen_whitening", "{}"))
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise ValueError(f"whitening file '{path}' is unreadable or corrupt ({e}); delete it and refit") from None
        meta.pop("eigenvalues", None)
        try:
            whitening = cls(tensors["mean"], tensors["basis"], tensors["eigenvalues"], meta)
        except KeyError as e:
            raise ValueError(f"whitening file '{path}' is corrupt (no tensor {e}); delete it and refit") from None
        # The fingerprint hashes the tensors at save time: a mismatch means the bytes changed since.
        if meta.get("fingerprint") != whitening.fingerprint():
            raise ValueError(f"whitening file '{path}' is corrupt: its tensors do not match the fingerprint "
                             f"stored with them; delete it and refit")
        return whitening


def _all_reduce_(*tensors: torch.Tensor) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in tensors:
            torch.distributed.all_reduce(t)


def _broadcast_(t: torch.Tensor) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(t, src=0)


class _Moments:
    """Streaming Σ(x−c), Σ(x−c)(x−c)ᵀ P for a fixed probe P (or the full second moment).

    The shift c (the first batch's mean, shared by all ranks) keeps float64 sums
    from cancelling: scattering coefficients have large means and small variances.
    """

    def __init__(self, shift: torch.Tensor, probe: torch.Tensor | None) -> None:
        D = shift.shape[0]
        self.shift, self.probe = shift, probe
        self.n = torch.zeros((), dtype=torch.float64)
        self.total = torch.zeros(D, dtype=torch.float64)
        k = D if probe is None else probe.shape[1]
        self.product = torch.zeros(D, k, dtype=torch.float64)

    def add(self, coeffs: torch.Tensor) -> None:
        x = coeffs.reshape(coeffs.shape[0], -1).float() - self.shift.float()
        self.n += x.shape[0]
        self.total += x.sum(0).double()
        if self.probe is None:
            self.product += (x.T @ x).double()
        else:
            self.product += (x.T @ (x @ self.probe.float())).double()

    def covariance_times_probe(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(C P, μ, n) with the unbiased covariance C, after summing over ranks."""
        _all_reduce_(self.n, self.total, self.product)
        n = int(self.n.item())
        if n < 2:
            raise ValueError(f"the whitening fit needs at least 2 images, got {n}")
        mean_shifted = self.total / n
        probe = torch.eye(len(self.total), dtype=torch.float64) if self.probe is None else self.probe
        cp = (self.product - n * torch.outer(mean_shifted, mean_shifted @ probe)) / (n - 1)
        return cp, mean_shifted + self.shift.double(), n


def _first_batch_mean(batches: Iterable[torch.Tensor]) -> torch.Tensor:
    for coeffs in batches:
        shift = coeffs.reshape(coeffs.shape[0], -1).double().mean(0)
        _broadcast_(shift)
        return shift
    raise ValueError("the whitening fit received no data: the train split is empty")


def _pass(batches: Callable[[], Iterable[torch.Tensor]], moments: _Moments, desc: str, progress: bool):
    for coeffs in progress_bar(batches(), desc=desc, disable=not progress, leave=False):
        moments.add(coeffs)
    return moments.covariance_times_probe()


def fit_whitening(
    batches: Callable[[], Iterable[torch.Tensor]],
    d: int,
    method: str = "auto",
    oversample: int = 64,
    power_iters: int = 2,
    eps: float = 1e-6,
    seed: int = 0,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> Whitening:
    """Fit z = Λ^{-1/2} Uᵀ (s − μ) from a stream of coeff batches (B, D) or (B, C, h, w).

    `batches()` must return a fresh iterator over the same data at each call: the exact
    fit makes one pass, the randomized fit 1 + max(power_iters, 1).
    Memory: O(D²) for exact, O(D·(d + oversample)) for randomized; never O(n).
    """
    shift = _first_batch_mean(batches())
    D = shift.shape[0]
    if not 0 < d <= D:
        raise ValueError(f"whitening.d={d} must be between 1 and the scattering dimension D={D}")
    k = min(d + oversample, D)
    if method == "auto":
        method = "exact" if D <= EXACT_MAX_DIM or 2 * k >= D else "randomized"
    if method == "exact":
        cov, mean, n = _pass(batches, _Moments(shift, None), "whitening (exact)", progress)
        eigenvalues, vectors = torch.linalg.eigh(cov)
    elif method == "randomized":
        generator = torch.Generator().manual_seed(seed)
        probe = torch.randn(D, k, generator=generator, dtype=torch.float64)
        passes = max(power_iters, 1) + 1
        for i in range(passes):
            cp, mean, n = _pass(batches, _Moments(shift, probe), f"whitening pass {i + 1}/{passes}", progress)
            if i < passes - 1:
                probe = torch.linalg.qr(cp).Q
        # Rayleigh–Ritz: the eigenpairs of Pᵀ C P lift to approximate eigenpairs of C.
        small = probe.T @ cp
        eigenvalues, rotation = torch.linalg.eigh((small + small.T) / 2)
        vectors = probe @ rotation
    else:
        raise ValueError(f"whitening.method must be auto, exact or randomized, got {method!r}")
    order = torch.argsort(eigenvalues, descending=True)[:d]
    eigenvalues, vectors = eigenvalues[order], vectors[:, order]
    # Fix each direction's sign so that fits agree across ranks and reruns.
    signs = torch.sign(vectors[vectors.abs().argmax(0), torch.arange(d)])
    vectors = vectors * signs
    floor = eps * eigenvalues[0].clamp_min(torch.finfo(torch.float64).tiny)
    eigenvalues = eigenvalues.clamp_min(floor)
    for t in (mean, vectors, eigenvalues):
        _broadcast_(t)
    meta = dict(metadata or {}, method=method, num_images=n)
    return Whitening(mean, vectors, eigenvalues, meta)
