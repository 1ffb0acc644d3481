"""The maths of the fast scattering: each linear stage and its adjoint, in pure torch.

    S_J x = ( x∗φ_J,  |x∗ψ_λ1|∗φ_J,  ||x∗ψ_λ1|∗ψ_λ2|∗φ_J ),   λ = (j, θ), j2 > j1.

kymatio's convolution + subsampling by k = 2^j is, in Fourier (``subsample_fourier``),

    Ŷ[u, v] = 1/k² Σ_{a,b<k} X̂[u + a·m, v + b·n] · ψ̂[u + a·m, v + b·n],   (m, n) = (M/k, N/k)

i.e. a product followed by the mean over the k×k spectral aliases. Here it is a
single contraction over the alias axes (:func:`alias_product`) with the 1/k² folded
into the filters, batched over all filters of a scale, followed by one batched ``ifft2``.

The final low-pass ``Re(ifft2(periodise(fft2(U)·φ̂)))`` followed by kymatio's
unpadding ``[1:-1, 1:-1]`` is a real linear map. φ̂ is a separable (rank-1)
Gaussian, so the map is ``S = R U Cᵀ`` with two small real matrices built in float64
(:func:`lowpass_operators`); this replaces an fft2/ifft2 pair per path by two GEMMs.

Every linear stage has its adjoint here (reflect padding, alias product, low-pass),
for the hand-written gradient of :class:`scatgen.scattering.FastScattering2D`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "reflect_pad",
    "reflect_pad_adjoint",
    "alias_product",
    "alias_adjoint",
    "alias_gemm_layout",
    "alias_product_gemm",
    "alias_adjoint_gemm",
    "modulus",
    "lowpass_operators",
    "lowpass_separable",
    "lowpass_separable_adjoint",
]


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
    # On CPU, writing into a preallocated output beats letting the broadcast op
    # allocate it (fresh large allocations page-fault); `out=` has no autograd, so
    # only without grad.
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

    torch's complex ``abs`` is a scalar hypot on CPU, slower than these two
    vectorised passes. The backward is kymatio's ``ModulusStable``: grad·z/|z|, and 0 where z = 0.
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


def lowpass_operators(
    phi: torch.Tensor, k: int, rtol: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The low-pass as separable matrices, for a rank-1 φ̂ = r ⊗ c.

    The low-pass of U: (..., k·m, k·n) real at subsampling k, unpadded, is

        L(U) = Re(ifft2(periodise_k(fft2(U)·φ̂) / k²))[..., 1:-1, 1:-1].

    With B_r = IDFT_{m} · P_k · diag(r) · DFT_{k·m} (P_k: mean over the k aliases;
    B_c likewise for columns), dropping the unpadded border rows,

        L(U) = Re(B_r U B_cᵀ) = Re B_r · U · Re B_cᵀ − Im B_r · U · Im B_cᵀ.

    Returns (Re B_r, Re B_c, Im B_r, Im B_c) in float32, shapes (m−2, k·m) and
    (n−2, k·n); the Im pair is None when its term is below float32 resolution (φ̂ is
    an even Gaussian, so Im B ≈ 0). phi is the raw kymatio filter (no /k²); a φ̂ that
    is not rank-1 to ``rtol`` is a ValueError.
    """
    P = phi.double()
    u, s, vh = torch.linalg.svd(P)
    r, c = u[:, 0] * s[0], vh[0]
    if torch.linalg.norm(P - torch.outer(r, c)) > rtol * torch.linalg.norm(P):
        raise ValueError("the low-pass filter phi is not rank-1: it has no separable form")

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
