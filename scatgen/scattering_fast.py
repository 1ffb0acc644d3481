"""A fast, exact order-2 2D scattering transform in pure torch.

Computes exactly what ``kymatio``'s ``ScatteringTorch2D(J, shape, L, max_order=2)``
computes (same Morlet filters, padding, subsampling, unpadding and channel order),
reorganised so that the work is a few large batched operations:

    S_J x = ( x∗φ_J,  |x∗ψ_λ1|∗φ_J,  ||x∗ψ_λ1|∗ψ_λ2|∗φ_J ),   λ = (j, θ), j2 > j1.

kymatio's convolution + subsampling by k = 2^j is, in Fourier (``subsample_fourier``),

    Ŷ[u, v] = 1/k² Σ_{a,b<k} X̂[u + a·m, v + b·n] · ψ̂[u + a·m, v + b·n],   (m, n) = (M/k, N/k)

i.e. a product followed by the mean over the k×k spectral aliases. Here it is a
single contraction over the alias axes (:func:`alias_product`) with the 1/k² folded
into the filters, batched over all L orientations of a scale (and all L×L
orientation pairs of a scale pair), followed by one batched ``ifft2``.

The final low-pass ``Re(ifft2(periodise(fft2(U)·φ̂)))`` followed by kymatio's
unpadding ``[1:-1, 1:-1]`` is a real linear map. φ̂ is a separable (rank-1)
Gaussian, so the map is ``S = R U Cᵀ`` with two small real matrices built in float64
(:func:`lowpass_operators`); this replaces an fft2/ifft2 pair per path by two GEMMs.
When φ̂ is not rank-1 to float32 precision (never observed) the FFT route is used.

The gradient is hand-written (:class:`_ScatteringFunction`): the forward keeps only
the modulus phases Z/|Z|, and the backward applies each stage's adjoint in reverse
(Rᵀ·g·C, ·Z/|Z|, fft2, the alias tiling, Re ifft2, folding of the padding), chunked
like the forward. ``custom_backward=False`` differentiates through autograd instead.

Filters are kymatio's, built once per (J, L, padded shape) and optionally cached on
disk (:func:`load_filter_bank`); they are non-persistent buffers (never in a
state_dict), and follow the module across devices.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "FastScattering2D",
    "compute_padding",
    "load_filter_bank",
    "build_filter_bank",
    "filter_bank_key",
    "alias_product",
    "alias_adjoint",
    "lowpass_operators",
    "scattering_channels",
]

_CACHE_FORMAT = "kymatio-0.3-morlet2d-v1"


# --------------------------------------------------------------------------- geometry


def scattering_channels(J: int, L: int) -> int:
    """K = 1 + J·L + L²·J(J−1)/2 channels per input map (order 0, 1, 2)."""
    return 1 + J * L + L * L * J * (J - 1) // 2


def compute_padding(M: int, N: int, J: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """kymatio's padded size and (top, bottom, left, right) reflect padding.

    Padded size = (⌊(M + 2^J)/2^J⌋ + 1)·2^J: a multiple of 2^J with ≥ 2^J margin, so
    that after subsampling by 2^J one row/column is dropped on each side (unpad).
    """
    Mp = ((M + 2**J) // 2**J + 1) * 2**J
    Np = ((N + 2**J) // 2**J + 1) * 2**J
    pads = ((Mp - M) // 2, (Mp - M + 1) // 2, (Np - N) // 2, (Np - N + 1) // 2)
    return (Mp, Np), pads


def reflect_pad(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """Reflect-pad (B, M, N) → (B, M + top + bottom, N + left + right), as kymatio.

    torch's reflect padding needs pad < size; when pad == size kymatio pads by one
    less and then appends the row/column next to the (new) border on each side.
    """
    B, M, N = x.shape
    top, bottom, left, right = pads
    fix_rows, fix_cols = top == M, left == N
    if fix_rows:
        top, bottom = top - 1, bottom - 1
    if fix_cols:
        left, right = left - 1, right - 1
    y = nn.functional.pad(x[:, None], (left, right, top, bottom), mode="reflect")[:, 0]
    if fix_rows:
        y = torch.cat([y[:, 1:2], y, y[:, -2:-1]], dim=1)
    if fix_cols:
        y = torch.cat([y[:, :, 1:2], y, y[:, :, -2:-1]], dim=2)
    return y


def reflect_pad_adjoint(g: torch.Tensor, pads: tuple[int, int, int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Adjoint of :func:`reflect_pad`: (B, Mp, Np) → (B, M, N) = shape.

    Each padded pixel's gradient is added to the pixel it copies. The source map is
    reflect_pad applied to pixel indices, so it agrees with the forward in every case
    (pad == size included) by construction.
    """
    M, N = shape
    # float64 holds the indices exactly (M·N < 2^53).
    index = torch.arange(M * N, dtype=torch.float64, device=g.device).view(1, M, N)
    source = reflect_pad(index, pads).reshape(-1).long()
    out = torch.zeros(g.shape[0], M * N, dtype=g.dtype, device=g.device)
    return out.index_add_(1, source, g.reshape(g.shape[0], -1)).view(-1, M, N)


# ------------------------------------------------------------------------ filter bank


def filter_bank_key(J: int, L: int, padded_shape: tuple[int, int]) -> str:
    """Short hash naming the filter bank of (J, L, padded shape) in the disk cache."""
    text = f"{_CACHE_FORMAT}|J={J}|L={L}|shape={padded_shape[0]}x{padded_shape[1]}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _kymatio_filter_bank(M: int, N: int, J: int, L: int) -> dict:
    # Imported lazily: kymatio's filter construction is slow (seconds) and only
    # needed on a cache miss. `kymatio.torch` fails to import with scipy >= 1.17.
    from kymatio.scattering2d.filter_bank import filter_bank

    return filter_bank(M, N, J, L)


def build_filter_bank(J: int, L: int, padded_shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """kymatio's Fourier-domain Morlet filters as plain float32 tensors.

    Returns ``{"psi_{j}_{res}": (L, Mp/2^res, Np/2^res)}`` for every scale j and
    resolution res kymatio builds, and ``{"phi_{res}": (Mp/2^res, Np/2^res)}``.
    """
    Mp, Np = padded_shape
    fb = _kymatio_filter_bank(Mp, Np, J, L)
    out: dict[str, torch.Tensor] = {}
    for j in range(J):
        psis = [p for p in fb["psi"] if p["j"] == j]
        assert [p["theta"] for p in psis] == list(range(L))
        for res in range(len(psis[0]["levels"])):
            stack = np.stack([np.asarray(p["levels"][res], dtype=np.float32) for p in psis])
            out[f"psi_{j}_{res}"] = torch.from_numpy(stack).contiguous()
    for res, level in enumerate(fb["phi"]["levels"]):
        out[f"phi_{res}"] = torch.from_numpy(np.asarray(level, dtype=np.float32)).contiguous()
    return out


def load_filter_bank(
    J: int, L: int, padded_shape: tuple[int, int], cache_dir: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """The filter bank of (J, L, padded shape), from ``cache_dir`` when cached.

    A pure function of its arguments (plus the cache content). On a miss the bank is
    built with kymatio and, if ``cache_dir`` is given, written atomically (temp file
    + ``os.replace``) to ``scattering2d_J{J}_L{L}_{Mp}x{Np}_{key}.safetensors``.
    """
    from safetensors.torch import load_file, save_file

    padded_shape = (int(padded_shape[0]), int(padded_shape[1]))
    if cache_dir is None:
        return build_filter_bank(J, L, padded_shape)
    cache_dir = Path(cache_dir)
    path = cache_dir / (
        f"scattering2d_J{J}_L{L}_{padded_shape[0]}x{padded_shape[1]}_"
        f"{filter_bank_key(J, L, padded_shape)}.safetensors"
    )
    if path.exists():
        try:
            return load_file(str(path))
        except Exception:  # corrupt or truncated file: rebuild and overwrite it
            pass
    bank = build_filter_bank(J, L, padded_shape)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=cache_dir)
    os.close(fd)
    try:
        save_file(bank, tmp, metadata={"format": _CACHE_FORMAT, "J": str(J), "L": str(L)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return bank


# ------------------------------------------------------------------------------ maths


def alias_product(X: torch.Tensor, filt: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Filter multiply fused with the k×k spectral periodisation.

    X: (..., k·m, k·n) complex spectrum; filt: (F, k·m, k·n), already /k² (complex
    dtype for k > 1: the contraction is then one complex batched GEMM). Returns
    (..., F, m, n) complex with

        out[..., f, u, v] = Σ_{a,b<k} X[..., u + a·m, v + b·n] · filt[f, u + a·m, v + b·n]

    i.e. for each output frequency (u, v) a (batch × k²) @ (k² × F) product, so the
    (..., F, k·m, k·n) full-size product is never materialised. ``out`` (no autograd)
    is an optional preallocated result for k ≤ 2.
    """
    *batch, M, N = X.shape
    F = filt.shape[0]
    # On CPU, writing into a preallocated output is ~3x faster than letting the
    # broadcast op allocate it; `out=` has no autograd, so only without grad.
    prealloc = not (torch.is_grad_enabled() and (X.requires_grad or filt.requires_grad))
    if k == 1:
        if prealloc:
            if out is None:
                out = torch.empty(*batch, F, M, N, dtype=X.dtype, device=X.device)
            return torch.mul(X.unsqueeze(-3), filt, out=out)
        return X.unsqueeze(-3) * filt
    m, n = M // k, N // k
    if k == 2:
        # 4 aliases: broadcast multiply-adds straight into the output layout beat
        # the GEMM, whose (u, v)-major result needs a slow transposing copy.
        Xv, fv = X.reshape(-1, 1, 2, m, 2, n), filt.reshape(F, 2, m, 2, n)
        if prealloc:
            if out is None:
                out = torch.empty(Xv.shape[0], F, m, n, dtype=X.dtype, device=X.device)
            out = out.view(Xv.shape[0], F, m, n)
            torch.mul(Xv[:, :, 0, :, 0], fv[:, 0, :, 0], out=out)
        else:
            out = Xv[:, :, 0, :, 0] * fv[:, 0, :, 0]
        out.addcmul_(Xv[:, :, 0, :, 1], fv[:, 0, :, 1])
        out.addcmul_(Xv[:, :, 1, :, 0], fv[:, 1, :, 0])
        out.addcmul_(Xv[:, :, 1, :, 1], fv[:, 1, :, 1])
        return out.reshape(*batch, F, m, n)
    out = torch.einsum("xambn,fambn->xfmn", X.reshape(-1, k, m, k, n), filt.reshape(F, k, m, k, n))
    return out.contiguous().reshape(*batch, F, m, n)


def alias_gemm_layout(filt: torch.Tensor, k: int) -> torch.Tensor:
    """filt (F, k·m, k·n) → (m·n, k², F): one (k² × F) matrix per output frequency."""
    F, M, N = filt.shape
    m, n = M // k, N // k
    return filt.reshape(F, k, m, k, n).permute(2, 4, 1, 3, 0).reshape(m * n, k * k, F).contiguous()


def alias_product_gemm(X: torch.Tensor, filt_t: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`alias_product` with the filter in :func:`alias_gemm_layout` (k ≥ 4).

    The einsum in alias_product transposes the filter on every call; here that is
    done once, and only X is transposed: (..., k·m, k·n) → (..., F, m, n).
    """
    *batch, M, N = X.shape
    m, n = M // k, N // k
    mn, _, F = filt_t.shape
    Xt = X.reshape(-1, k, m, k, n).permute(2, 4, 0, 1, 3).reshape(mn, -1, k * k)  # (m·n, X, k²)
    Y = torch.bmm(Xt, filt_t).view(m, n, -1, F).permute(2, 3, 0, 1)  # (X, F, m, n), strided
    if out is None:
        return Y.contiguous().view(*batch, F, m, n)
    return out.view(-1, F, m, n).copy_(Y).view(*batch, F, m, n)


def alias_adjoint_gemm(gY: torch.Tensor, filt_t: torch.Tensor, k: int, out: torch.Tensor,
                       accumulate: bool = False) -> torch.Tensor:
    """:func:`alias_adjoint` with the filter in :func:`alias_gemm_layout`.

    Per output frequency (u, v), the k² aliases of every map are one (X × F)·(F × k²)
    product (filters real-valued: no conj); faster than F broadcast passes when k ≥ 8.
    """
    *batch, F, m, n = gY.shape
    Gt = gY.reshape(-1, F, m * n).permute(2, 0, 1)  # (m·n, X, F)
    R = torch.bmm(Gt, filt_t.transpose(1, 2)).view(m, n, -1, k, k).permute(2, 3, 0, 4, 1)  # (X, k, m, k, n)
    ov = out.view(-1, k, m, k, n)
    if accumulate:
        ov.add_(R)
    else:
        ov.copy_(R)
    return out


def alias_adjoint(
    gY: torch.Tensor, filt: torch.Tensor, k: int, out: torch.Tensor | None = None, accumulate: bool = False
) -> torch.Tensor:
    """Adjoint of :func:`alias_product` in its first argument.

    gY: (..., F, m, n) complex; filt: (F, k·m, k·n) complex. Returns (..., k·m, k·n) with

        out[..., p] = Σ_f conj(filt[f, p]) · gY[..., f, p mod (m, n)]

    (the k×k tiling of gY, weighted, summed over filters), written into ``out`` or,
    with ``accumulate``, added to it. kymatio keeps only the real part of its filters'
    FFTs, so the filters here are real-valued and conj is the identity.
    """
    *batch, F, m, n = gY.shape
    if out is None:
        out = torch.empty(*batch, k * m, k * n, dtype=gY.dtype, device=gY.device)
    ov = out.view(-1, k, m, k, n)
    gv = gY.reshape(-1, F, 1, m, 1, n)
    fv = filt.view(F, k, m, k, n)
    # One multiply-add per filter, each broadcasting gY over the k×k aliases: F passes
    # over the output, none of them a reduction over a strided axis.
    for f in range(F):
        if f == 0 and not accumulate:
            torch.mul(gv[:, 0], fv[0], out=ov)
        else:
            ov.addcmul_(gv[:, f], fv[f])
    return out


class _Modulus(torch.autograd.Function):
    """|z| for complex z, computed as sqrt(re² + im²) on the real view.

    torch's complex ``abs`` is several times slower on CPU (scalar hypot). The
    backward is kymatio's ``ModulusStable``: grad·z/|z|, and 0 where z = 0.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        sq = torch.view_as_real(z).square()
        out = (sq[..., 0] + sq[..., 1]).sqrt_()
        ctx.save_for_backward(z, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        z, out = ctx.saved_tensors
        scale = (grad / out).masked_fill_(out == 0, 0)
        return z * scale


def modulus(z: torch.Tensor, overwrite: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """|z|: (...) complex → (...) real, with a zero subgradient at 0.

    overwrite=True lets it square z in place (z is then garbage) when no gradient
    is needed, saving a full-size allocation; ``out`` is an optional result buffer.
    """
    if torch.is_grad_enabled() and z.requires_grad:
        return _Modulus.apply(z)
    zr = torch.view_as_real(z)
    sq = zr.square_() if overwrite else zr.square()
    return torch.add(sq[..., 0], sq[..., 1], out=out).sqrt_()


def lowpass_fft(U: torch.Tensor, phi: torch.Tensor, k: int) -> torch.Tensor:
    """Reference low-pass: Re(ifft2(periodise_k(fft2(U)·φ̂)))[..., 1:-1, 1:-1].

    U: (..., k·m, k·n) real; phi: (k·m, k·n), already /k² (complex for k > 1, see
    :func:`alias_product`). → (..., m−2, n−2). Used when φ̂ is not rank-1.
    """
    Y = alias_product(torch.fft.fft2(U), phi[None], k)[..., 0, :, :]
    return torch.fft.ifft2(Y).real[..., 1:-1, 1:-1]


def lowpass_fft_adjoint(g: torch.Tensor, phi: torch.Tensor, k: int) -> torch.Tensor:
    """Adjoint of :func:`lowpass_fft`: (..., m−2, n−2) → (..., k·m, k·n) real.

    Crop → zero border; Re → real part embedded; ifft2 → fft2/(m·n); alias → tiling
    times conj φ̂; fft2 of a real map → Re of the unnormalised ifft2.
    """
    g_full = nn.functional.pad(g, (1, 1, 1, 1)).to(phi.dtype)
    gY = torch.fft.fft2(g_full, norm="forward")
    gX = alias_adjoint(gY.unsqueeze(-3), phi[None], k)
    return torch.fft.ifft2(gX, norm="forward").real


def lowpass_operators(
    phi: torch.Tensor, k: int, rtol: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Separable form of :func:`lowpass_fft` for a rank-1 φ̂ = r ⊗ c, or None.

    With B_r = IDFT_{m} · P_k · diag(r) · DFT_{k·m} (P_k: mean over the k aliases;
    B_c likewise for columns), dropping the unpadded border rows,

        lowpass_fft(U) = Re(B_r U B_cᵀ) = Re B_r · U · Re B_cᵀ − Im B_r · U · Im B_cᵀ.

    Returns (Re B_r, Re B_c, Im B_r, Im B_c) in float32, shapes (m−2, k·m) and
    (n−2, k·n); the Im pair is None when its term is below float32 resolution (φ̂ is
    an even Gaussian, so Im B ≈ 0). phi is the raw kymatio filter (no /k²).
    """
    P = phi.double()
    u, s, vh = torch.linalg.svd(P)
    r, c = u[:, 0] * s[0], vh[0]
    if torch.linalg.norm(P - torch.outer(r, c)) > rtol * torch.linalg.norm(P):
        return None

    def one_axis(f: torch.Tensor) -> torch.Tensor:
        Mk = f.shape[0]
        m = Mk // k
        dft = torch.fft.fft(torch.eye(Mk, dtype=torch.float64), dim=0)  # (Mk, Mk)
        per = torch.eye(m, dtype=torch.float64).repeat(1, k) / k  # (m, Mk): alias mean
        B = torch.fft.ifft(per.to(torch.complex128) @ (f[:, None] * dft), dim=0)  # (m, Mk)
        return B[1:-1]

    Br, Bc = one_axis(r), one_axis(c)
    # Size of the Im term relative to the Re term (both are products of two axes).
    im_rel = (Br.imag.abs().max() * Bc.imag.abs().max()) / (Br.real.abs().max() * Bc.real.abs().max())
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    if im_rel < 1e-9:
        return f32(Br.real), f32(Bc.real), None, None
    return f32(Br.real), f32(Bc.real), f32(Br.imag), f32(Bc.imag)


def lowpass_separable(
    U: torch.Tensor, Rr: torch.Tensor, Cr: torch.Tensor, Ri: torch.Tensor | None, Ci: torch.Tensor | None
) -> torch.Tensor:
    """S = Rr·U·Crᵀ (− Ri·U·Ciᵀ): (..., M, N) real → (..., m−2, n−2)."""
    S = Rr @ (U @ Cr.T)  # U @ Cᵀ first: one large GEMM, then a small one
    if Ri is not None:
        S = S - Ri @ (U @ Ci.T)
    return S


def lowpass_separable_adjoint(
    g: torch.Tensor, Rr: torch.Tensor, Cr: torch.Tensor, Ri: torch.Tensor | None, Ci: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adjoint of :func:`lowpass_separable`: Rrᵀ·g·Cr (− Riᵀ·g·Ci), (..., m−2, n−2) → (..., M, N)."""
    # Rᵀ·g first: a small product, then one large GEMM writing the output.
    gU = torch.matmul(Rr.T @ g, Cr, out=out)
    if Ri is not None:
        gU -= (Ri.T @ g) @ Ci
    return gU


# ----------------------------------------------------------------------------- module


class FastScattering2D(nn.Module):
    """Order-2 2D scattering, numerically equal to kymatio's ``ScatteringTorch2D``.

    x: (..., H, W) real → (..., K, H/2^J, W/2^J), K = 1 + J·L + L²·J(J−1)/2, with
    channels ordered as kymatio: order 0; order 1 by (j1, θ1); order 2 by
    (j1, θ1, j2, θ2), j2 > j1.

    Args:
        J: number of scales (subsampling 2^J).
        shape: input spatial size (H, W); each must be ≥ 2^J.
        L: number of orientations.
        cache_dir: directory for the on-disk filter cache (None: no disk cache).
        chunk_size: images (maps) per batch chunk; None picks a cache-friendly
            size on CPU and the whole batch on CUDA.
        custom_backward: differentiate with the hand-written adjoint
            (:class:`_ScatteringFunction`), which keeps only the modulus phases of
            the forward; False runs plain autograd through every op (a reference,
            slower and heavier in memory).

    Without autograd the module reuses scratch memory across calls, so one instance
    must not run in several threads at once (processes, e.g. DataLoader workers, are fine).
    """

    def __init__(
        self,
        J: int,
        shape: tuple[int, int],
        L: int = 8,
        cache_dir: str | Path | None = None,
        chunk_size: int | None = None,
        custom_backward: bool = True,
    ) -> None:
        super().__init__()
        M, N = int(shape[0]), int(shape[1])
        if 2**J > M or 2**J > N:
            raise ValueError(f"the smallest dimension of {shape} must be >= 2^J = {2**J}")
        self.J, self.L, self.shape = J, L, (M, N)
        self.K = scattering_channels(J, L)
        self.padded_shape, self.pads = compute_padding(M, N, J)
        self.out_shape = (self.padded_shape[0] // 2**J - 2, self.padded_shape[1] // 2**J - 2)
        self.chunk_size = chunk_size
        self.custom_backward = custom_backward
        self._scratch: dict[str, torch.Tensor] = {}

        bank = load_filter_bank(J, L, self.padded_shape, cache_dir)
        buf = lambda name, t: self.register_buffer(name, t.contiguous(), persistent=False)  # noqa: E731
        # Wavelets with the alias mean 1/k² folded in; complex when k > 1 so that
        # alias_product is a complex GEMM (2-3x faster than a real view on CPU).
        as_filter = lambda f, k: (f / k**2).to(torch.complex64 if k > 1 else torch.float32)  # noqa: E731
        for j1 in range(J):
            buf(f"psi1_{j1}", as_filter(bank[f"psi_{j1}_0"], 2**j1))
            for j2 in range(j1 + 1, J):
                buf(f"psi2_{j1}_{j2}", as_filter(bank[f"psi_{j2}_{j1}"], 2 ** (j2 - j1)))
                if j2 - j1 >= 2:  # k ≥ 4: the GEMM form wins (a second copy, as large)
                    buf(f"psi2t_{j1}_{j2}", alias_gemm_layout(getattr(self, f"psi2_{j1}_{j2}"), 2 ** (j2 - j1)))
        # Low-pass φ_J at each resolution res, subsampling by 2^(J−res).
        self._lowpass_kind: dict[int, str] = {}
        for res in range(J):
            k = 2 ** (J - res)
            ops = lowpass_operators(bank[f"phi_{res}"], k)
            if ops is None:
                self._lowpass_kind[res] = "fft"
                buf(f"phi_{res}", as_filter(bank[f"phi_{res}"], k))
            else:
                self._lowpass_kind[res] = "separable"
                names = ("row", "col", "row_im", "col_im")
                for name, op in zip(names, ops):
                    if op is not None:
                        buf(f"lp{res}_{name}", op)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # The filters are fixed float32/complex64 data: follow device moves
        # (`.to(device)`, `.cuda()`) but ignore dtype casts (`.half()`, `.double()`),
        # which would lose precision or, for complex filters, the imaginary part.
        # The target device is read off a tiny probe tensor passed through `fn`.
        for name, buf in self._buffers.items():
            if buf is not None:
                device = fn(torch.empty(0, device=buf.device)).device
                self._buffers[name] = buf.to(device)
        return self

    # -- helpers
    def _lowpass(self, U: torch.Tensor, res: int) -> torch.Tensor:
        if self._lowpass_kind[res] == "fft":
            return lowpass_fft(U, getattr(self, f"phi_{res}"), 2 ** (self.J - res))
        g = lambda n: getattr(self, n, None)  # noqa: E731
        return lowpass_separable(U, g(f"lp{res}_row"), g(f"lp{res}_col"), g(f"lp{res}_row_im"), g(f"lp{res}_col_im"))

    def _lowpass_adjoint(self, g: torch.Tensor, res: int, out: torch.Tensor | None = None) -> torch.Tensor:
        if self._lowpass_kind[res] == "fft":
            return lowpass_fft_adjoint(g, getattr(self, f"phi_{res}"), 2 ** (self.J - res))
        g_ = lambda n: getattr(self, n, None)  # noqa: E731
        return lowpass_separable_adjoint(
            g, g_(f"lp{res}_row"), g_(f"lp{res}_col"), g_(f"lp{res}_row_im"), g_(f"lp{res}_col_im"), out=out
        )

    def _ifft_modulus(self, Y: torch.Tensor, name: str, phases: list[torch.Tensor] | None) -> torch.Tensor:
        """U = |ifft2(Y)|, in scratch ``name``. With ``phases``, Z/|Z| is appended to it
        (0 where Z = 0, _Modulus's subgradient): all the backward needs of this stage."""
        dev = Y.device
        Z = torch.fft.ifft2(Y)
        U = self._buffer(name, Y.shape, torch.float32, dev)
        if phases is None:
            return modulus(Z, overwrite=True, out=U)
        zr = torch.view_as_real(Z)
        sq = torch.square(zr, out=self._buffer("sq", zr.shape, torch.float32, dev))
        U = torch.add(sq[..., 0], sq[..., 1], out=U).sqrt_()
        # Z = 0 exactly where U = 0, and there 0 · 1/tiny = 0.
        inv = torch.clamp_min(U, torch.finfo(U.dtype).tiny, out=self._buffer("inv", U.shape, U.dtype, dev))
        phases.append(Z.mul_(inv.reciprocal_()))
        return U

    def _default_chunk(self, device: torch.device) -> int:
        if device.type != "cpu":
            return 1 << 30
        # Largest intermediate per map: the (L, L, Mp/2, Np/2) complex order-2 tensor
        # (or (L, Mp, Np) at order 1); keep it ~8 MB so that peak memory stays low, but
        # take at least 4 maps: at 128² fewer maps leave the per-op overhead dominant.
        Mp, Np = self.padded_shape
        per_map = 8 * max(self.L * Mp * Np, self.L * self.L * Mp * Np // 4)
        return max(4, (8 << 20) // per_map)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """A reusable scratch tensor (None when autograd is on).

        Chunks run one after another and every intermediate dies within its chunk, so the
        large ones are written into the same memory each time: on CPU, fresh multi-MB
        allocations cost page faults comparable to the arithmetic itself.
        """
        if torch.is_grad_enabled():
            return None
        numel = math.prod(shape)
        buf = self._scratch.get(name)
        # Inference tensors may not be written outside inference mode (and vice versa).
        if (buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device
                or buf.is_inference() != torch.is_inference_mode_enabled()):
            buf = self._scratch[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def _scatter(self, x: torch.Tensor, phases: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B, M, N) real → (B, K, M/2^J, N/2^J).

        With ``phases`` (a list), the modulus phases are appended to it in the order
        :meth:`_scatter_backward` reads them: order 1 of j1, then order 2 of (j1, j2).
        """
        J, L = self.J, self.L
        B = x.shape[0]
        cplx, dev = torch.complex64, x.device
        xp = reflect_pad(x, self.pads)  # (B, Mp, Np)
        out = [self._lowpass(xp, 0)[:, None]]  # order 0: (B, 1, m, n)
        X = torch.fft.fft2(xp)  # (B, Mp, Np) complex
        order2: list[torch.Tensor] = []
        for j1 in range(J):
            # |x ∗ ψ_{j1,θ1}| subsampled by 2^j1, all θ1 at once: (B, L, Mp/2^j1, Np/2^j1)
            shape1 = (B, L, X.shape[-2] >> j1, X.shape[-1] >> j1)
            Y1 = alias_product(X, getattr(self, f"psi1_{j1}"), 2**j1, out=self._buffer("Y", shape1, cplx, dev))
            U1 = self._ifft_modulus(Y1, "U1", phases)
            out.append(self._lowpass(U1, j1))  # (B, L, m, n)
            if j1 == J - 1:
                continue
            # fft2 of a real tensor first copies it to complex; reuse that copy's memory.
            U1c = self._buffer("U1c", shape1, cplx, dev)
            U1_hat = torch.fft.fft2(U1 if U1c is None else U1c.copy_(U1))
            per_j2 = []
            for j2 in range(j1 + 1, J):
                # ||x ∗ ψ1| ∗ ψ_{j2,θ2}| for all (θ1, θ2): (B, L, L, Mp/2^j2, Np/2^j2)
                k = 2 ** (j2 - j1)
                shape2 = (B, L, L, U1.shape[-2] // k, U1.shape[-1] // k)
                Yb = self._buffer("Y", shape2, cplx, dev)
                if k >= 4 and Yb is not None:
                    Y2 = alias_product_gemm(U1_hat, getattr(self, f"psi2t_{j1}_{j2}"), k, out=Yb)
                else:
                    Y2 = alias_product(U1_hat, getattr(self, f"psi2_{j1}_{j2}"), k, out=Yb if k <= 2 else None)
                U2 = self._ifft_modulus(Y2, "U2", phases)
                per_j2.append(self._lowpass(U2, j2))  # (B, L, L, m, n)
            # kymatio order: θ1 outer, then (j2, θ2).
            S2 = torch.stack(per_j2, dim=2)  # (B, L, J−1−j1, L, m, n)
            order2.append(S2.reshape(B, -1, *S2.shape[-2:]))
        return torch.cat(out + order2, dim=1)

    def _scatter_backward(self, gS: torch.Tensor, phases: list[torch.Tensor]) -> torch.Tensor:
        """Adjoint of :meth:`_scatter` at the point whose ``phases`` it kept.

        gS: (B, K, m, n) → (B, M, N). Every stage in reverse: low-pass → Rᵀ·g·C;
        modulus → g·Z/|Z|; ifft2 → fft2/(m·n); alias product → :func:`alias_adjoint`;
        fft2 of a real map → Re of the unnormalised ifft2; padding → folding back.
        """
        J, L = self.J, self.L
        B, dev, cplx, real = gS.shape[0], gS.device, torch.complex64, torch.float32
        saved = iter(phases)
        offset = 1 + J * L  # first order-2 channel
        gX = self._buffer("gX", (B, *self.padded_shape), cplx, dev)
        for j1 in range(J):
            P1 = next(saved)  # (B, L, Mp/2^j1, Np/2^j1)
            gU1 = self._lowpass_adjoint(gS[:, 1 + j1 * L : 1 + (j1 + 1) * L], j1,
                                        out=self._buffer("U1", P1.shape, real, dev))
            if j1 < J - 1:
                count = L * (J - 1 - j1) * L
                g2 = gS[:, offset : offset + count].unflatten(1, (L, J - 1 - j1, L))  # θ1, j2, θ2
                offset += count
                gU1_hat = self._buffer("U1c", P1.shape, cplx, dev)
                for i, j2 in enumerate(range(j1 + 1, J)):
                    P2 = next(saved)  # (B, L, L, Mp/2^j2, Np/2^j2)
                    gU2 = self._lowpass_adjoint(g2[:, :, i], j2, out=self._buffer("U2", P2.shape, real, dev))
                    gZ2 = torch.mul(gU2, P2, out=self._buffer("Y", P2.shape, cplx, dev))
                    # (fft2's out= costs a copy on CPU: let it allocate)
                    gY2 = torch.fft.fft2(gZ2, norm="forward")
                    k = 2 ** (j2 - j1)
                    if k >= 8:
                        alias_adjoint_gemm(gY2, getattr(self, f"psi2t_{j1}_{j2}"), k, gU1_hat, accumulate=i > 0)
                    else:
                        alias_adjoint(gY2, getattr(self, f"psi2_{j1}_{j2}"), k, out=gU1_hat, accumulate=i > 0)
                gU1 += torch.fft.ifft2(gU1_hat, norm="forward").real
            gZ1 = torch.mul(gU1, P1, out=self._buffer("Y", P1.shape, cplx, dev))
            gY1 = torch.fft.fft2(gZ1, norm="forward")
            alias_adjoint(gY1, getattr(self, f"psi1_{j1}"), 2**j1, out=gX, accumulate=j1 > 0)
        gxp = self._lowpass_adjoint(gS[:, 0], 0)
        gxp += torch.fft.ifft2(gX, norm="forward").real
        return reflect_pad_adjoint(gxp, self.pads, self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != self.shape:
            raise ValueError(f"expected input of spatial size {self.shape}, got {tuple(x.shape[-2:])}")
        batch = x.shape[:-2]
        # Filters are float32 (as kymatio's): compute in float32, return in the input's
        # floating dtype.
        out_dtype = x.dtype if x.is_floating_point() else torch.float32
        x = x.reshape(-1, *self.shape).to(torch.float32)
        if self.custom_backward and torch.is_grad_enabled() and x.requires_grad:
            S = _ScatteringFunction.apply(x, self)
        else:
            chunk = self.chunk_size or self._default_chunk(x.device)
            parts = [self._scatter(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)]
            S = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return S.reshape(*batch, *S.shape[1:]).to(out_dtype)

    def extra_repr(self) -> str:
        return f"J={self.J}, shape={self.shape}, L={self.L}, K={self.K}, padded_shape={self.padded_shape}"


class _ScatteringFunction(torch.autograd.Function):
    """x (B, M, N) float32 → S (B, K, m, n), differentiated by the hand-written adjoint.

    The forward runs the no-grad path chunk by chunk and keeps only the modulus phases
    Z/|Z| of every stage (complex, about half what autograd would keep); the backward
    replays the chunks through :meth:`FastScattering2D._scatter_backward`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: FastScattering2D) -> torch.Tensor:  # type: ignore[override]
        chunk = module.chunk_size or module._default_chunk(x.device)
        parts, phases = [], []
        for i in range(0, x.shape[0], chunk):
            parts.append(module._scatter(x[i : i + chunk], phases))
        ctx.module, ctx.chunk, ctx.num_chunks = module, chunk, len(parts)
        ctx.save_for_backward(*phases)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    @staticmethod
    @once_differentiable
    def backward(ctx, gS: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        phases, chunk = ctx.saved_tensors, ctx.chunk
        per_chunk = len(phases) // ctx.num_chunks
        gS = gS.to(torch.float32)  # e.g. bf16 under autocast
        parts = [
            ctx.module._scatter_backward(gS[i * chunk : (i + 1) * chunk], phases[i * per_chunk : (i + 1) * per_chunk])
            for i in range(ctx.num_chunks)
        ]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)), None
