import pytest
import torch

import scatgen
from scatgen.bundle import load_bundle, save_bundle
from scatgen.config import PriorConfig
from scatgen.pipeline import Pipeline
from scatgen.prior import FlowPrior, fit_gmm, fit_prior, load_prior, save_prior


def two_clusters(n=2000, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    which = torch.rand(n, generator=g) < 0.3
    centre = torch.where(which[:, None], torch.full((d,), 4.0), torch.full((d,), -2.0))
    return centre + 0.5 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_gmm_recovers_a_two_cluster_mixture(covariance):
    prior = fit_gmm(two_clusters(), components=2, covariance=covariance, seed=0)
    order = prior.means[:, 0].argsort()
    torch.testing.assert_close(prior.weights[order], torch.tensor([0.7, 0.3]), atol=0.03, rtol=0)
    torch.testing.assert_close(prior.means[order][:, 0], torch.tensor([-2.0, 4.0]), atol=0.1, rtol=0)
    samples = prior.sample(4000, seed=1)
    assert ((samples[:, 0] > 1).float().mean() - 0.3).abs() < 0.03


def test_flow_prior_learns_a_shifted_scaled_gaussian():
    g = torch.Generator().manual_seed(0)
    codes = 3.0 + 0.5 * torch.randn(4000, 4, generator=g)
    cfg = PriorConfig(kind="flow", width=64, depth=2, fit_steps=400, batch_size=256, lr=3e-3, sample_steps=16)
    prior = fit_prior(codes, cfg, seed=0)
    samples = prior.sample(2000, seed=1)
    torch.testing.assert_close(samples.mean(0), torch.full((4,), 3.0), atol=0.15, rtol=0)
    torch.testing.assert_close(samples.std(0), torch.full((4,), 0.5), atol=0.15, rtol=0)


@pytest.mark.parametrize("kind", ["gmm", "flow"])
def test_prior_save_load_roundtrip_and_seeding(tmp_path, kind):
    cfg = PriorConfig(kind=kind, components=2, width=32, depth=1, fit_steps=20, sample_steps=4)
    prior = fit_prior(two_clusters(n=300), cfg, seed=0)
    path = save_prior(prior, tmp_path / f"{kind}.safetensors")
    loaded = load_prior(path)
    assert type(loaded) is type(prior)
    assert torch.equal(loaded.sample(8, seed=3), prior.sample(8, seed=3))
    assert not torch.equal(loaded.sample(8, seed=3), loaded.sample(8, seed=4))
    assert torch.equal(loaded.sample(8, seed=3, temperature=0.5), prior.sample(8, seed=3, temperature=0.5))


def test_corrupt_prior_file_is_named(tmp_path):
    prior = FlowPrior(d=4, width=8, depth=1)
    path = save_prior(prior, tmp_path / "flow.safetensors")
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match=r"prior file .*flow.safetensors.* corrupt"):
        load_prior(path)
    with pytest.raises(FileNotFoundError, match="fit-prior"):
        load_prior(tmp_path / "missing.safetensors")


def test_bad_sampling_arguments():
    prior = FlowPrior(d=4, width=8, depth=1)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            prior.sample(2, temperature=bad)
    with pytest.raises(ValueError, match="number of samples"):
        prior.sample(0)


def test_run_bundle_holds_the_configured_prior(run_dir):
    pipe = scatgen.load(run_dir)
    assert set(pipe.priors) == {"normal", "flow"} and pipe.default_prior == "flow"
    assert torch.equal(pipe.random_codes(4, seed=2), pipe.priors["flow"].sample(4, seed=2))
    with pytest.raises(ValueError, match="no 'gmm' prior in this bundle.*fit-prior RUN --kind gmm"):
        pipe.sample(2, prior="gmm")


def test_bundle_without_a_prior_loads_with_normal(run_dir, tmp_path):
    generator, whitening, cfg = load_bundle(run_dir)
    save_bundle(tmp_path / "old", generator, whitening, cfg)  # as bundles were written before priors
    pipe = scatgen.load(tmp_path / "old")
    assert list(pipe.priors) == ["normal"] and pipe.default_prior == "normal"
    assert pipe.sample(3, seed=0, refine=0).shape == (3, 3, 32, 32)


def test_prior_of_another_code_size_is_refused(run_dir):
    generator, whitening, cfg = load_bundle(run_dir)
    with pytest.raises(ValueError, match="d=5.*refit"):
        Pipeline(generator, whitening, cfg, priors={"flow": FlowPrior(d=5, width=8, depth=1)})
