"""FastScattering2D equals kymatio's ScatteringTorch2D (values, gradients) and runs on
CUDA; the operators of scattering_ops pass dot-product tests of their adjoints; the
filter bank is cached on disk."""

from __future__ import annotations

import copy

import pytest
import torch

from scatgen import filter_bank, scattering_ops
from scatgen.filter_bank import compute_padding, load_filter_bank, scattering_channels
from scatgen.scattering import FastScattering2D

RTOL = 1e-5


@pytest.fixture(scope="module")
def kymatio_cls():
    # `kymatio.torch` fails to import with scipy >= 1.17; the frontend module works.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, OpenMP spinning makes kymatio's
    many small ops several times slower and the runtime erratic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# kymatio builds its filters in Python loops (seconds per shape): build each bank once
# per session, and hand the same one to FastScattering2D (via its kymatio hook).
_kymatio_modules: dict = {}


def _kymatio(cls, J, shape, L):
    key = (J, tuple(shape), L)
    if key not in _kymatio_modules:
        _kymatio_modules[key] = cls(J=J, shape=shape, L=L, max_order=2)
    return _kymatio_modules[key]


@pytest.fixture(autouse=True)
def shared_filter_banks(monkeypatch, kymatio_cls):
    """Serve filter_bank._kymatio_filter_bank from the reference modules' filters."""
    real = filter_bank._kymatio_filter_bank

    def shared(M, N, J, L):
        for m in _kymatio_modules.values():
            if (m._M_padded, m._N_padded, m.J, m.L) == (M, N, J, L):
                return {"phi": m.phi, "psi": m.psi}
        return real(M, N, J, L)

    monkeypatch.setattr(filter_bank, "_kymatio_filter_bank", shared)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, J: int, L: int, rtol: float = RTOL) -> None:
    assert ours.shape == ref.shape
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < rtol, f"global relative error {rel:.2e}"
    # Max-abs error of each channel group (order 0, 1, 2) relative to its own scale.
    groups = {"order0": slice(0, 1), "order1": slice(1, 1 + J * L), "order2": slice(1 + J * L, None)}
    for name, sl in groups.items():
        a, b = ours[..., sl, :, :], ref[..., sl, :, :]
        if b.numel() == 0:
            continue
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < rtol, f"{name}: max-abs relative error {err:.2e}"


GRID = [
    # (J, L, (H, W)): every J in 2..5 and L in {4, 8}, square and non-square, one
    # side at 128. Kept small: kymatio's filter construction dominates the runtime.
    (2, 8, (48, 64)),
    (2, 4, (128, 96)),
    (3, 4, (32, 64)),
    (3, 8, (32, 32)),
    (4, 8, (64, 64)),
    (4, 4, (48, 64)),
    (5, 4, (32, 32)),
]


@pytest.mark.parametrize("J,L,shape", GRID, ids=[f"J{J}-L{L}-{h}x{w}" for J, L, (h, w) in GRID])
def test_equals_kymatio(kymatio_cls, J, L, shape):
    torch.manual_seed(J * 100 + L)
    x = torch.rand(1, 2, *shape)  # (B, C, H, W); kymatio's forward is slow, keep it small
    ref = _kymatio(kymatio_cls, J, shape, L)(x)
    ours = FastScattering2D(J, shape, L)(x)  # filters shared with `ref` (see fixture)
    assert ours.shape == (1, 2, scattering_channels(J, L), shape[0] // 2**J, shape[1] // 2**J)
    assert_close(ours, ref, J, L)


def test_small_chunks_and_batch_shapes(kymatio_cls):
    J, L, shape = 3, 4, (32, 32)
    x = torch.randn(5, *shape)  # (B, H, W), batch not a multiple of the chunk
    ref = _kymatio(kymatio_cls, J, shape, L)(x)
    ours = FastScattering2D(J, shape, L, chunk_size=2)(x)
    assert_close(ours, ref, J, L)
    single = FastScattering2D(J, shape, L)(x[0])  # (H, W)
    assert_close(single, ref[0], J, L)


def test_scratch_reuse_across_calls_and_modes(kymatio_cls):
    """Without autograd the large intermediates live in reused scratch memory: calls of
    different batch sizes, in inference mode and out of it, must not disturb each other."""
    J, L, shape = 3, 4, (32, 32)
    module = FastScattering2D(J, shape, L, chunk_size=3)
    x = torch.randn(7, *shape)
    ref = _kymatio(kymatio_cls, J, shape, L)(x)
    with torch.inference_mode():
        first = module(x)
        small = module(x[:2])
    with torch.no_grad():
        again = module(x[1:])
    assert module._scratch  # the scratch path was taken
    assert_close(first, ref, J, L)
    assert_close(small, ref[:2], J, L)
    assert_close(again, ref[1:], J, L)
    assert_close(first, module(x), J, L)  # and the autograd path agrees


def _gradient(module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """∂/∂x of ⟨S x, w⟩."""
    x = x.clone().requires_grad_(True)
    (module(x) * w).sum().backward()
    return x.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("custom", [True, False], ids=["custom-backward", "autograd"])
def test_gradient_matches_kymatio(kymatio_cls, custom):
    J, L, shape = 3, 4, (32, 32)
    torch.manual_seed(0)
    x = torch.rand(2, 1, *shape)
    w = torch.randn(2, 1, scattering_channels(J, L), 4, 4)
    ref = _gradient(_kymatio(kymatio_cls, J, shape, L), x, w)
    ours = _gradient(FastScattering2D(J, shape, L, custom_backward=custom), x, w)
    assert _rel(ours, ref) < RTOL


_kymatio64: dict = {}


@pytest.mark.parametrize("J,L,shape", GRID, ids=[f"J{J}-L{L}-{h}x{w}" for J, L, (h, w) in GRID])
def test_custom_backward_matches_kymatio_float64(kymatio_cls, J, L, shape):
    """The hand-written adjoint against kymatio's autograd in float64 (its filters cast
    to float64): the float32 computation inside FastScattering2D is the only error."""
    key = (J, shape, L)
    if key not in _kymatio64:
        _kymatio64[key] = copy.deepcopy(_kymatio(kymatio_cls, J, shape, L)).double()
    torch.manual_seed(J * 10 + L)
    x = torch.rand(2, 3, *shape, dtype=torch.float64)  # (B, C, H, W)
    w = torch.randn(2, 3, scattering_channels(J, L), shape[0] // 2**J, shape[1] // 2**J, dtype=torch.float64)
    ref = _gradient(_kymatio64[key], x, w)
    ours = _gradient(FastScattering2D(J, shape, L), x, w)
    assert ours.dtype == torch.float64
    assert _rel(ours, ref) < RTOL
    # No region is off: the worst pixel is within 1e-5 of the largest gradient.
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < RTOL


def test_custom_backward_float32_and_chunks(kymatio_cls):
    """float32 input, chunks smaller than the batch (and not dividing it), weights
    on one order at a time: custom backward = autograd path = kymatio."""
    J, L, shape = 3, 8, (32, 48)
    torch.manual_seed(1)
    x = torch.rand(5, 3, *shape)
    ref_module = _kymatio(kymatio_cls, J, shape, L)
    custom = FastScattering2D(J, shape, L, chunk_size=2)
    plain = FastScattering2D(J, shape, L, chunk_size=2, custom_backward=False)
    K = scattering_channels(J, L)
    for sl in (slice(0, 1), slice(1, 1 + J * L), slice(1 + J * L, K)):  # order 0, 1, 2
        w = torch.zeros(5, 3, K, 4, 6)
        w[:, :, sl] = torch.randn_like(w[:, :, sl])
        ref = _gradient(ref_module, x, w)
        assert _rel(_gradient(custom, x, w), ref) < RTOL  # float32 throughout: stated 1e-5
        assert _rel(_gradient(custom, x, w), _gradient(plain, x, w)) < 1e-6


def test_custom_backward_at_zero_modulus(kymatio_cls):
    """A constant image makes every wavelet response 0: the modulus subgradient is 0
    there (kymatio's ModulusStable), so only the low-pass order 0 carries gradient."""
    J, L, shape = 2, 4, (32, 32)
    x = torch.zeros(1, 1, *shape)
    w = torch.randn(1, 1, scattering_channels(J, L), 8, 8)
    ref = _gradient(_kymatio(kymatio_cls, J, shape, L), x, w)
    ours = _gradient(FastScattering2D(J, shape, L), x, w)
    assert ours.isfinite().all()
    assert _rel(ours, ref) < RTOL


def test_custom_backward_saves_less_than_autograd():
    """The custom Function keeps only the modulus phases; plain autograd keeps every
    intermediate (measured: about half as much at this size)."""
    J, L, shape = 3, 4, (32, 32)
    x = torch.rand(2, 3, *shape)
    saved = {}
    for custom in (True, False):
        nbytes = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal nbytes
            nbytes += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            FastScattering2D(J, shape, L, custom_backward=custom)(x.clone().requires_grad_(True))
        saved[custom] = nbytes
    assert 0 < saved[True] < 0.6 * saved[False], saved


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Real inner product ⟨a, b⟩ = Re Σ conj(a)·b, the one the adjoints are taken in."""
    a, b = a.flatten(), b.flatten()
    return torch.vdot(a, b).real.item() if a.is_complex() else torch.dot(a, b).item()


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_alias_adjoint_is_the_adjoint(k):
    """⟨A X, G⟩ = ⟨X, Aᵀ G⟩ in float64 for the alias product and both adjoint forms."""
    torch.manual_seed(k)
    F, m, n = 3, 5, 6
    c = torch.complex128
    filt = torch.randn(F, k * m, k * n, dtype=torch.float64).to(c)  # real-valued, as kymatio's
    X = torch.randn(2, 4, k * m, k * n, dtype=c)
    G = torch.randn(2, 4, F, m, n, dtype=c)
    lhs = _dot(scattering_ops.alias_product(X, filt, k), G)
    adj = scattering_ops.alias_adjoint(G, filt, k)
    assert abs(lhs - _dot(X, adj)) < 1e-10 * abs(lhs)
    filt_t = scattering_ops.alias_gemm_layout(filt, k)
    torch.testing.assert_close(scattering_ops.alias_product_gemm(X, filt_t, k),
                               scattering_ops.alias_product(X, filt, k))
    out = torch.randn_like(X)
    torch.testing.assert_close(scattering_ops.alias_adjoint_gemm(G, filt_t, k, out.clone(), accumulate=True), out + adj)
    torch.testing.assert_close(scattering_ops.alias_adjoint(G, filt, k, out.clone(), accumulate=True), out + adj)


@pytest.mark.parametrize("shape,J", [((32, 32), 5), ((32, 48), 3), ((20, 36), 2)])
def test_reflect_pad_adjoint_is_the_adjoint(shape, J):
    """Including kymatio's pad == size case (32×32 at J=5 pads 32 on each side)."""
    _, pads = compute_padding(*shape, J)
    torch.manual_seed(0)
    x = torch.randn(3, *shape, dtype=torch.float64)
    xp = scattering_ops.reflect_pad(x, pads)
    g = torch.randn_like(xp)
    assert abs(_dot(xp, g) - _dot(x, scattering_ops.reflect_pad_adjoint(g, pads, shape))) < 1e-10 * abs(_dot(xp, g))


def _lowpass_filters(J: int, shape: tuple[int, int]) -> list[tuple[int, torch.Tensor]]:
    """(subsampling k, φ̂) at every resolution of the L = 4 bank for (J, shape)."""
    padded, _ = compute_padding(*shape, J)
    bank = load_filter_bank(J, 4, padded)
    return [(2 ** (J - res), bank[f"phi_{res}"]) for res in range(J)]


@pytest.mark.parametrize("J,shape", [(2, (32, 48)), (4, (64, 64))])
def test_lowpass_adjoints_are_the_adjoints(J, shape):
    torch.manual_seed(0)
    for k, phi in _lowpass_filters(J, shape):
        phi = phi.double()
        U = torch.randn(2, *phi.shape, dtype=torch.float64)
        ops = [None if op is None else op.double() for op in scattering_ops.lowpass_operators(phi, k)]
        S = scattering_ops.lowpass_separable(U, *ops)
        g = torch.randn_like(S)
        assert abs(_dot(S, g) - _dot(U, scattering_ops.lowpass_separable_adjoint(g, *ops))) < 1e-10 * abs(_dot(S, g))


def test_filters_not_in_state_dict_and_dtype_casts(kymatio_cls):
    m = FastScattering2D(2, (32, 32), 4)
    assert len(list(m.buffers())) > 0
    assert m.state_dict() == {}
    x = torch.rand(1, 32, 32)
    ref = m(x)
    # dtype casts of the module leave the filters alone; devices follow `.to`.
    m = m.double().half().to("cpu").to(torch.float32)
    assert {b.dtype for b in m.buffers()} <= {torch.float32, torch.complex64}
    torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    out64 = m(x.double())
    assert out64.dtype == torch.float64
    assert_close(out64.float(), ref, 2, 4)


def _lowpass_fft(U: torch.Tensor, phi: torch.Tensor, k: int) -> torch.Tensor:
    """kymatio's low-pass, unpadded: Re(ifft2(periodise_k(fft2(U)·φ̂/k²)))[..., 1:-1, 1:-1]."""
    Y = scattering_ops.alias_product(torch.fft.fft2(U), (phi / k**2).to(torch.complex64)[None], k)[..., 0, :, :]
    return torch.fft.ifft2(Y).real[..., 1:-1, 1:-1]


@pytest.mark.parametrize("J,shape", [(2, (32, 48)), (4, (64, 64))])
def test_separable_lowpass_equals_fft_lowpass(J, shape):
    """The GEMM low-pass R·U·Cᵀ equals kymatio's Re(ifft2(periodise(fft2(U)·φ̂))), unpadded."""
    torch.manual_seed(0)
    for k, phi in _lowpass_filters(J, shape):
        U = torch.rand(3, *phi.shape)
        ref = _lowpass_fft(U, phi, k)
        ops = scattering_ops.lowpass_operators(phi, k)  # phi is rank-1 up to float32 rounding
        ours = scattering_ops.lowpass_separable(U, *ops)
        assert ours.shape == ref.shape == (3, phi.shape[0] // k - 2, phi.shape[1] // k - 2)
        assert ((ours - ref).norm() / ref.norm()).item() < 1e-6


def test_lowpass_operators_reject_a_non_separable_phi():
    phi = torch.eye(16) + 0.5  # rank 16
    with pytest.raises(ValueError, match="not rank-1"):
        scattering_ops.lowpass_operators(phi, 2)


def test_rejects_wrong_shape():
    with pytest.raises(ValueError):
        FastScattering2D(2, (32, 32), 4)(torch.rand(1, 32, 30))
    with pytest.raises(ValueError):
        FastScattering2D(6, (32, 32), 4)


def test_filter_cache_hit_and_invalidation(tmp_path, monkeypatch, kymatio_cls):
    calls = []
    real = filter_bank._kymatio_filter_bank  # the session-shared banks (fixture), or kymatio

    def counting(M, N, J, L):
        calls.append((M, N, J, L))
        return real(M, N, J, L)

    monkeypatch.setattr(filter_bank, "_kymatio_filter_bank", counting)
    x = torch.rand(1, 32, 32)

    first = FastScattering2D(2, (32, 32), 4, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(calls) == 1 and len(files) == 1
    assert not list(tmp_path.glob(".tmp-*")), "temp file left behind"

    # Hit: a second construction loads from disk, kymatio is not called again.
    second = FastScattering2D(2, (32, 32), 4, cache_dir=tmp_path)
    assert len(calls) == 1
    torch.testing.assert_close(second(x), first(x), rtol=0, atol=0)
    assert_close(second(x), _kymatio(kymatio_cls, 2, (32, 32), 4)(x), 2, 4)

    # Invalidation: any of J, L or the (padded) shape changes the key and the file.
    FastScattering2D(3, (32, 32), 4, cache_dir=tmp_path)
    FastScattering2D(2, (32, 32), 8, cache_dir=tmp_path)
    FastScattering2D(2, (32, 64), 4, cache_dir=tmp_path)
    assert len(calls) == 4
    assert len(list(tmp_path.glob("*.safetensors"))) == 4

    # The loader is a pure function of its arguments plus the cache.
    padded, _ = compute_padding(32, 32, 2)
    bank = load_filter_bank(2, 4, padded, tmp_path)
    assert len(calls) == 4
    assert bank["psi_0_0"].shape == (4, *padded) and bank["phi_0"].shape == padded


def test_corrupt_cache_file_is_rebuilt(tmp_path):
    FastScattering2D(2, (32, 32), 4, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(b"garbage")
    m = FastScattering2D(2, (32, 32), 4, cache_dir=tmp_path)
    assert m(torch.rand(1, 32, 32)).isfinite().all()
    assert path.stat().st_size > 100


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("J,L,shape", [(4, 8, (64, 64)), (3, 4, (32, 64))])
def test_cuda_equals_kymatio(kymatio_cls, J, L, shape):
    torch.manual_seed(0)
    x = torch.rand(4, 3, *shape)
    ref = _kymatio(kymatio_cls, J, shape, L)(x)
    module = FastScattering2D(J, shape, L).to("cuda")
    assert all(b.device.type == "cuda" for b in module.buffers())
    ours = module(x.cuda())
    assert ours.device.type == "cuda"
    assert_close(ours.cpu(), ref, J, L)
    xg = x[:1].cuda().requires_grad_(True)
    module(xg).sum().backward()
    assert xg.grad is not None and xg.grad.isfinite().all()
