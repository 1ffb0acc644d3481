"""images → coeffs: the fixed order-2 wavelet scattering transform S_J.

    S_J x = ( x∗φ_J,  |x∗ψ_λ1|∗φ_J,  ||x∗ψ_λ1|∗ψ_λ2|∗φ_J )

Colour images are scattered per channel:
(B, 3, N, N) → (B, 3K, N/2^J, N/2^J) with K = 1 + JL + L²J(J−1)/2.

Two backends compute the same numbers: `fast` (:class:`FastScattering2D`, vectorised)
and `kymatio` (the reference). Filters are buffers that never enter a state_dict.

:class:`FastScattering2D` computes exactly what kymatio's
``ScatteringTorch2D(J, shape, L, max_order=2)`` computes (same Morlet filters, padding,
subsampling, unpadding and channel order), reorganised so that the work is a few large
batched operations: the alias products of a scale batched over all L orientations
(and all L×L orientation pairs of a scale pair), one batched ``ifft2`` each, and the
low-pass as two GEMMs (the maths and their adjoints: :mod:`scatgen.scattering_ops`).
Its filters are kymatio's, built once per (J, L, padded shape) and optionally cached
on disk (:mod:`scatgen.filter_bank`); they are non-persistent buffers and follow the
module across devices.

Its gradient is hand-written (:class:`_ScatteringFunction`): the forward keeps only
the modulus phases Z/|Z|, and the backward applies each stage's adjoint in reverse
(Rᵀ·g·C, ·Z/|Z|, fft2, the alias tiling, Re ifft2, folding of the padding), chunked
like the forward. ``custom_backward=False`` differentiates through autograd instead.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from scatgen.filter_bank import compute_padding, load_filter_bank, scattering_channels
from scatgen.scattering_ops import (
    alias_adjoint,
    alias_adjoint_gemm,
    alias_gemm_layout,
    alias_product,
    alias_product_gemm,
    lowpass_operators,
    lowpass_separable,
    lowpass_separable_adjoint,
    modulus,
    reflect_pad,
    reflect_pad_adjoint,
)

__all__ = ["Scattering", "FastScattering2D"]

# The separable low-pass matrices (Re B_r, Re B_c, Im B_r, Im B_c) of lowpass_operators.
_LOWPASS_NAMES = ("row", "col", "row_im", "col_im")


def _kymatio_module(J: int, shape: tuple[int, int], L: int) -> nn.Module:
    # `kymatio.torch` also imports the 3D frontend, which fails with scipy >= 1.17.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    module = ScatteringTorch2D(J=J, shape=shape, L=L, max_order=2)
    # Filters are a pure function of (J, L, shape): keep them out of state_dicts.
    for name, buf in list(module.named_buffers(recurse=False)):
        module._buffers.pop(name)
        module.register_buffer(name, buf, persistent=False)
    return module


class Scattering(nn.Module):
    """Order-2 scattering per colour channel.

    images (B, C, H, W) → coeffs (B, C·K, H/2^J, W/2^J), K = 1 + JL + L²J(J−1)/2.
    """

    def __init__(
        self,
        J: int,
        image_size: int | tuple[int, int],
        L: int = 8,
        backend: str = "fast",
        cache_dir: str | Path | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        shape = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if shape[0] % 2**J or shape[1] % 2**J:
            raise ValueError(f"image size {shape} must be a multiple of 2^J = {2**J} (J={J})")
        self.J, self.L, self.shape, self.backend = J, L, shape, backend
        self.K = scattering_channels(J, L)
        if backend == "kymatio":
            self.transform = _kymatio_module(J, shape, L)
        elif backend == "fast":
            self.transform = FastScattering2D(J=J, shape=shape, L=L, cache_dir=cache_dir)
        else:
            raise ValueError(f"encoder.backend must be 'fast' or 'kymatio', got {backend!r}")
        if compile:
            self.transform.compile()

    @property
    def out_shape(self) -> tuple[int, int, int]:
        """(3K, H/2^J, W/2^J) for RGB input."""
        return (3 * self.K, self.shape[0] // 2**self.J, self.shape[1] // 2**self.J)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[-2:]) != self.shape:
            raise ValueError(
                f"expected images of shape (B, C, {self.shape[0]}, {self.shape[1]}), got {tuple(images.shape)}"
            )
        coeffs = self.transform(images.float().contiguous())  # (B, C, K, H', W')
        B, C, K, h, w = coeffs.shape
        return coeffs.reshape(B, C * K, h, w)


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
        # alias_product is a complex GEMM (faster than a real view on CPU).
        as_filter = lambda f, k: (f / k**2).to(torch.complex64 if k > 1 else torch.float32)  # noqa: E731
        for j1 in range(J):
            buf(f"psi1_{j1}", as_filter(bank[f"psi_{j1}_0"], 2**j1))
            for j2 in range(j1 + 1, J):
                buf(f"psi2_{j1}_{j2}", as_filter(bank[f"psi_{j2}_{j1}"], 2 ** (j2 - j1)))
                if j2 - j1 >= 2:  # k ≥ 4: the GEMM form wins (a second copy, as large)
                    buf(f"psi2t_{j1}_{j2}", alias_gemm_layout(getattr(self, f"psi2_{j1}_{j2}"), 2 ** (j2 - j1)))
        # Low-pass φ_J at each resolution res, subsampling by 2^(J−res).
        for res in range(J):
            for name, op in zip(_LOWPASS_NAMES, lowpass_operators(bank[f"phi_{res}"], 2 ** (J - res))):
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
    def _lowpass_ops(self, res: int) -> list[torch.Tensor | None]:
        # The Im pair is not registered when lowpass_operators dropped it.
        return [getattr(self, f"lp{res}_{name}", None) for name in _LOWPASS_NAMES]

    def _lowpass(self, U: torch.Tensor, res: int) -> torch.Tensor:
        return lowpass_separable(U, *self._lowpass_ops(res))

    def _lowpass_adjoint(self, g: torch.Tensor, res: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return lowpass_separable_adjoint(g, *self._lowpass_ops(res), out=out)

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
        allocations cost page faults.
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
    Z/|Z| of every stage (where autograd would keep every intermediate); the backward
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
