import torch
import pytest

from scatgen.whitening import Whitening, fit_whitening


def _stream(x: torch.Tensor, batch: int = 64):
    return lambda: iter(x.split(batch))


def _data(n=3000, D=60, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A decaying spectrum and a large mean, like scattering coefficients.
    scales = torch.logspace(1, -2, D)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g)).Q
    x = (torch.randn(n, D, generator=g) * scales) @ basis.T + 50.0
    return x


def test_codes_of_fit_data_are_white():
    x = _data()
    w = fit_whitening(_stream(x), d=20, method="exact", progress=False)
    z = w(x)
    assert z.shape == (len(x), 20)
    cov = torch.cov(z.T.double())
    assert (cov - torch.eye(20, dtype=torch.float64)).norm() / 20**0.5 < 1e-3
    assert z.mean(0).norm() < 1e-3


def inverse(w, codes):
    """The coefficients a code stands for: μ + U Λ^{1/2} z."""
    return w.mean + w.coordinates(codes) @ w.basis.T


def test_inverse_after_forward_is_the_orthogonal_projection():
    x = _data(n=500)
    w = fit_whitening(_stream(x), d=10, method="exact", progress=False)
    s = x[:7].double()
    projected = inverse(w, w(x[:7])).double()
    mu, U = w.mean.double(), w.basis.double()
    expected = mu + (s - mu) @ U @ U.T
    assert torch.allclose(projected, expected, atol=1e-3)
    # A projection: applying it twice changes nothing.
    again = inverse(w, w(projected.float())).double()
    assert torch.allclose(again, projected, atol=1e-3)
    # With d = D it is the identity.
    full = fit_whitening(_stream(x), d=x.shape[1], method="exact", progress=False)
    assert torch.allclose(inverse(full, full(x[:7])), x[:7], atol=1e-2)
    # k leading coordinates are the first k of all d
    z = w(x[:3])
    assert torch.equal(w.coordinates(z, 4), w.coordinates(z)[:, :4])


def test_save_load_roundtrip(tmp_path):
    x = _data(n=400)
    w = fit_whitening(_stream(x), d=8, method="exact", progress=False, metadata={"J": 4, "L": 8})
    w.save(tmp_path / "w.safetensors")
    w2 = Whitening.load(tmp_path / "w.safetensors")
    assert torch.equal(w.basis, w2.basis) and torch.equal(w.mean, w2.mean)
    assert torch.equal(w.eigenvalues, w2.eigenvalues)
    assert w2.metadata["J"] == 4 and w2.metadata["L"] == 8
    assert w2.fingerprint() == w.fingerprint()
    assert torch.allclose(w(x[:5]), w2(x[:5]))


def test_load_rejects_corrupt_file(tmp_path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        Whitening.load(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Whitening.load(tmp_path / "missing.safetensors")


def test_randomized_fit_matches_exact_eigendecomposition():
    x = _data(n=3000, D=300)
    exact = fit_whitening(_stream(x, 256), d=16, method="exact", progress=False)
    rand = fit_whitening(_stream(x, 256), d=16, method="randomized", oversample=64, power_iters=2,
                         progress=False)
    # Leading eigenvalues agree closely ...
    rel = (rand.eigenvalues - exact.eigenvalues).abs() / exact.eigenvalues
    assert rel.max() < 1e-4, rel
    # ... and so do the subspaces: the principal angles are ~0.
    overlap = torch.linalg.svdvals(exact.basis.double().T @ rand.basis.double())
    assert overlap.min() > 0.999
    assert torch.allclose(rand.mean, exact.mean, atol=1e-4)


def test_exact_fit_matches_torch_cov():
    x = _data(n=800, D=40)
    w = fit_whitening(_stream(x, 100), d=40, method="exact", progress=False)
    expected = torch.linalg.eigvalsh(torch.cov(x.T.double())).flip(0)
    assert torch.allclose(w.eigenvalues[:20].double(), expected[:20], rtol=1e-4)


def test_shape_errors_name_the_problem():
    x = _data(n=200, D=30)
    w = fit_whitening(_stream(x), d=5, method="exact", progress=False)
    with pytest.raises(ValueError, match="D=30"):
        w(torch.randn(2, 31))
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        w.coordinates(torch.randn(2, 6))
    with pytest.raises(ValueError, match="between 1 and"):
        fit_whitening(_stream(x), d=31, method="exact", progress=False)

