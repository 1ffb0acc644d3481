import math

import pytest
import torch

import scatgen
from scatgen.bundle import load_bundle, save_bundle
from scatgen.config import PriorConfig
from scatgen.pipeline import Pipeline, slerp
from scatgen.prior import (AdaLNVelocityField, FlowPrior, LatentFlowPrior, StageBudget, fit_gmm, fit_prior, integrate,
                           integrate_sde, load_prior, save_prior)


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


@pytest.mark.slow
def test_flow_prior_learns_a_shifted_scaled_gaussian():
    g = torch.Generator().manual_seed(0)
    codes = 3.0 + 0.5 * torch.randn(4000, 4, generator=g)
    cfg = PriorConfig(kind="flow", width=64, depth=2, fit_steps=400, batch_size=256, lr=3e-3, sample_steps=16)
    prior = fit_prior(codes, cfg, seed=0)
    samples = prior.sample(2000, seed=1)
    torch.testing.assert_close(samples.mean(0), torch.full((4,), 3.0), atol=0.15, rtol=0)
    torch.testing.assert_close(samples.std(0), torch.full((4,), 0.5), atol=0.15, rtol=0)


@pytest.mark.parametrize("kind", ["gmm", "flow", "latent_flow"])
def test_prior_save_load_roundtrip_and_seeding(tmp_path, kind):
    cfg = PriorConfig(kind=kind, components=2, width=32, depth=1, fit_steps=20, sample_steps=4, latent=2,
                      autoencoder_steps=20)
    prior = fit_prior(two_clusters(n=300), cfg, seed=0, eigenvalues=torch.tensor([2.0, 1.0, 0.1]))
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


@pytest.mark.slow
def test_run_bundle_holds_the_configured_prior(run_dir):
    pipe = scatgen.load(run_dir)
    assert set(pipe.priors) == {"normal", "flow"} and pipe.default_prior == "flow"
    assert torch.equal(pipe.random_codes(4, seed=2), pipe.priors["flow"].sample(4, seed=2))
    with pytest.raises(ValueError, match="no 'gmm' prior in this bundle.*fit-prior RUN --kind gmm"):
        pipe.sample(2, prior="gmm")


@pytest.mark.slow
def test_bundle_without_a_prior_loads_with_normal(run_dir, tmp_path):
    generator, whitening, cfg = load_bundle(run_dir)
    save_bundle(tmp_path / "old", generator, whitening, cfg)  # as bundles were written before priors
    pipe = scatgen.load(tmp_path / "old")
    assert list(pipe.priors) == ["normal"] and pipe.default_prior == "normal"
    assert pipe.sample(3, seed=0, refine=0).shape == (3, 3, 32, 32)


@pytest.mark.slow
def test_prior_of_another_code_size_is_refused(run_dir):
    generator, whitening, cfg = load_bundle(run_dir)
    with pytest.raises(ValueError, match="d=5.*refit"):
        Pipeline(generator, whitening, cfg, priors={"flow": FlowPrior(d=5, width=8, depth=1)})


def curved_codes(n=3000, seed=0):
    """Codes on a curved 2-d surface in 12 dimensions, standardised like whitened codes."""
    g = torch.Generator().manual_seed(seed)
    u = 6 * torch.rand(n, 2, generator=g) - 3
    codes = torch.cat([u, torch.sin(u)], 1) @ torch.randn(4, 12, generator=g)
    return (codes - codes.mean(0)) / codes.std(0)


@pytest.fixture(scope="module")
def fitted_flows():
    codes = curved_codes()
    common = dict(width=64, depth=2, fit_steps=600, lr=3e-3, sample_steps=16, latent=4, autoencoder_steps=600,
                  code_weighting=0.0)
    return codes, {kind: fit_prior(codes, PriorConfig(kind=kind, **common), seed=0) for kind in ("flow", "latent_flow")}


def test_latent_flow_samples_lie_nearer_the_code_surface_than_noise(fitted_flows):
    codes, priors = fitted_flows
    data_nn = torch.cdist(codes[:500], codes[500:]).min(1).values.median()
    samples_nn = torch.cdist(priors["latent_flow"].sample(500, seed=1), codes).min(1).values.median()
    noise_nn = torch.cdist(torch.randn(500, 12, generator=torch.Generator().manual_seed(1)), codes).min(1).values.median()
    assert samples_nn < 0.5 * noise_nn, (samples_nn, noise_nn, data_nn)


@pytest.mark.parametrize("kind", ["flow", "latent_flow"])
def test_codes_map_to_noise_and_back(fitted_flows, kind):
    codes, priors = fitted_flows
    prior = priors[kind]
    noise, residual = prior.to_noise(codes[:64])
    back = prior.from_noise(noise, residual)
    assert ((back - codes[:64]).norm(dim=1) / codes[:64].norm(dim=1)).max() <= 1e-3
    # The noise is the discrete sampler's own start: from it, the sampler's ODE returns the state.
    state = prior.codes_to_state(codes[:64])
    again = integrate(prior.velocity, noise, 0.0, 1.0, prior.sample_steps)
    assert ((again - state).norm(dim=1) / state.norm(dim=1)).max() <= 1e-3


def test_a_flow_prior_draw_has_no_residual(fitted_flows):
    _, priors = fitted_flows
    drawn = priors["flow"].sample(32, seed=5)
    noise, residual = priors["flow"].to_noise(drawn)
    assert (residual.norm(dim=1) / drawn.norm(dim=1)).max() <= 1e-3
    start = torch.randn(32, 12, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(noise, start, atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", ["flow", "latent_flow"])
def test_variation_strength_moves_codes_gradually(fitted_flows, kind):
    codes, priors = fitted_flows
    prior = priors[kind]
    assert torch.equal(prior.vary(codes[:16], 0.0, seed=1), codes[:16])
    distance = {s: (prior.vary(codes[:16], s, seed=1) - codes[:16]).norm(dim=1).median() for s in (0.1, 1.0)}
    assert 0 < distance[0.1] < distance[1.0]
    with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
        prior.vary(codes[:2], -0.5)


def test_gmm_has_no_inverse():
    prior = fit_gmm(two_clusters(n=200), components=2)
    with pytest.raises(ValueError, match="'gmm' prior has no inverse.*path='code'"):
        prior.to_noise(two_clusters(n=4))
    with pytest.raises(ValueError, match="has no inverse"):
        prior.vary(two_clusters(n=4), 0.5)


@pytest.mark.slow
def test_pipeline_vary_and_interpolate_through_the_prior(run_dir):
    pipe = scatgen.load(run_dir)
    code = pipe.encode(pipe_test_images(pipe, 2))
    # strength 0: the image's own decoding, refined like it.
    torch.testing.assert_close(pipe.vary(code[0], 0.0, n=2), pipe.decode(code[:1]).expand(2, -1, -1, -1))
    assert pipe.vary(code[0], 0.7, n=3, seed=1, refine=0).shape == (3, 3, 32, 32)
    ends = pipe.interpolate_codes(code[:1], code[1:], torch.tensor([0.0, 0.5, 1.0]), path="prior")[0]
    torch.testing.assert_close(ends[[0, 2]], code, atol=1e-4, rtol=1e-4)
    strip = pipe.interpolate(code[0], code[1], steps=4, refine=0, path="prior")
    assert strip.shape == (4, 3, 32, 32)
    # Without a path: through an invertible prior's noise, the straight line for a slerp.
    assert pipe.interpolation_path() == "prior" and pipe.interpolation_path(spherical=True) == "code"
    torch.testing.assert_close(pipe.interpolate(code[0], code[1], steps=4, refine=0), strip)
    with pytest.raises(ValueError, match="path must be 'code'.*or 'prior'.*got 'noise'"):
        pipe.interpolate(code[0], code[1], path="noise")
    with pytest.raises(ValueError, match="spherical=True is a path between codes"):
        pipe.interpolate(code[0], code[1], spherical=True, path="prior")
    with pytest.raises(ValueError, match="strength"):
        pipe.vary(code[0], -1.0)
    with pytest.raises(ValueError, match="number of variations"):
        pipe.vary(code[0], 0.5, n=0)


@pytest.mark.slow
def test_interpolation_through_the_prior_fades_each_ends_residual(run_dir):
    generator, whitening, cfg = load_bundle(run_dir)
    codes = torch.randn(64, whitening.d, generator=torch.Generator().manual_seed(0))
    # A flow on the 4 leading components: the other d − 4 of a code are its residual.
    prior = fit_prior(codes, PriorConfig(kind="flow", dims=4, width=32, depth=1, fit_steps=20))
    pipe = Pipeline(generator, whitening, cfg, priors={"flow": prior})
    a, b = codes[:1], codes[1:2]
    (noise_a, rest_a), (noise_b, rest_b) = prior.to_noise(a), prior.to_noise(b)
    assert rest_a.norm() > 0.5 * a.norm()  # a real residual, which a linear blend would carry mid-path
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    path = pipe.interpolate_codes(a, b, t, path="prior")[0]
    drawn = prior.from_noise(slerp(noise_a[0], noise_b[0], t))  # the prior's own codes along the path
    assert torch.equal(path[[0, -1]], torch.cat([a, b]))  # the ends exactly, not their round trip
    # Weights (1 − t)² and t²: a quarter of each end's details mid-path, not the half of a blend.
    for i, w in enumerate(t.tolist()):
        expected = drawn[i] + (1 - w) ** 2 * rest_a[0] + w**2 * rest_b[0]
        torch.testing.assert_close(path[i], expected, atol=1e-4, rtol=1e-4)
    assert (path[2] - drawn[2]).norm() < 0.6 * (0.5 * (rest_a + rest_b)).norm()


def pipe_test_images(pipe, n):
    from scatgen.data import load_split

    dataset = load_split(pipe, "test")
    return torch.stack([dataset[i] for i in range(n)])


@pytest.mark.slow
def test_a_prior_without_an_inverse_cannot_interpolate_or_vary(run_dir):
    generator, whitening, cfg = load_bundle(run_dir)
    gmm = fit_gmm(torch.randn(64, whitening.d, generator=torch.Generator().manual_seed(0)), components=2)
    pipe = Pipeline(generator, whitening, cfg, priors={"gmm": gmm})
    codes = pipe.random_codes(2, prior="gmm")
    with pytest.raises(ValueError, match="'gmm' prior has no inverse"):
        pipe.interpolate(codes[0], codes[1], path="prior", prior="gmm", refine=0)
    assert pipe.interpolation_path(prior="gmm") == "code"  # its default path needs no inverse
    with pytest.raises(ValueError, match="'gmm' prior has no inverse"):
        pipe.vary(codes[0], 0.5, prior="gmm", refine=0)
    # The straight line needs no inverse.
    assert pipe.interpolate(codes[0], codes[1], steps=3, refine=0).shape == (3, 3, 32, 32)


@pytest.mark.slow
def test_code_weighting_spends_the_autoencoder_on_the_heavy_components():
    # Independent components cannot all pass a 2-d latent: the unweighted autoencoder shares it out
    # over all 8, the weighted one keeps the two components with large eigenvalues.
    codes = torch.randn(3000, 8, generator=torch.Generator().manual_seed(0))
    eigenvalues = torch.tensor([4.0, 4.0, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])
    errors = {}
    for gamma in (0.0, 0.5):
        cfg = PriorConfig(kind="latent_flow", width=64, depth=2, fit_steps=5, latent=2, autoencoder_steps=400,
                          lr=3e-3, code_weighting=gamma)
        prior = fit_prior(codes, cfg, seed=0, eigenvalues=eigenvalues)
        errors[gamma] = (prior.project(codes[:500]) - codes[:500])[:, :2].square().mean().item()
    assert errors[0.5] < 0.5 * errors[0.0], errors


def test_latent_noise_trades_the_autoencoders_fit_for_a_smoother_decoder():
    # Codes on a 2-d curved surface in 8-d: with a 2-d latent the noise-free autoencoder can fit
    # them closely, while noise on its latents blurs each code with its neighbours.
    angles = torch.rand(2000, 2, generator=torch.Generator().manual_seed(0)) * 3
    codes = torch.cat([angles.cos(), angles.sin(), (2 * angles).cos(), (2 * angles).sin()], 1)
    errors = {}
    for noise in (0.0, 0.5):
        cfg = PriorConfig(kind="latent_flow", width=64, depth=2, fit_steps=5, latent=2, autoencoder_steps=400,
                          lr=3e-3, code_weighting=0.0, latent_noise=noise)
        prior = fit_prior(codes, cfg, seed=0)
        errors[noise] = (prior.project(codes[:500]) - codes[:500]).square().mean().item()
    assert errors[0.0] < 0.5 * errors[0.5], errors


def test_code_weighting_needs_the_eigenvalues():
    cfg = PriorConfig(kind="latent_flow", width=8, depth=1, fit_steps=2, latent=2, autoencoder_steps=2)
    with pytest.raises(ValueError, match="code_weighting=0.25 .*eigenvalues"):
        fit_prior(two_clusters(n=50), cfg)
    with pytest.raises(ValueError, match="2 eigenvalues for codes of d=3"):
        fit_prior(two_clusters(n=50), cfg, eigenvalues=torch.ones(2))
    with pytest.raises(ValueError, match="positive"):
        fit_prior(two_clusters(n=50), cfg, eigenvalues=torch.tensor([1.0, 0.0, 1.0]))


def test_stage_budget_ends_at_whichever_of_steps_and_seconds_runs_out_and_decays_with_it():
    now = [0.0]
    budget = StageBudget(steps=300, seconds=10.0, clock=lambda: now[0])
    assert budget.progress() == 0
    budget.taken = 150  # past the 100 warm-up steps
    now[0] = 2.0
    assert budget.progress() == 0.5  # steps bind
    now[0] = 8.0
    assert budget.progress() == 0.8  # the clock binds
    assert budget.lr_factor() == pytest.approx(0.5 * (1 + math.cos(0.8 * math.pi)))
    now[0] = 12.0
    assert budget.progress() > 1 and budget.lr_factor() == 0
    steps_only = StageBudget(steps=100, clock=lambda: now[0] * 1e6)
    steps_only.taken = 99
    assert steps_only.progress() == 0.99


@pytest.mark.parametrize("kind", ["flow", "latent_flow"])
def test_prior_fit_stops_at_its_time_budget_and_reports_its_steps(kind):
    common = dict(kind=kind, width=8, depth=1, sample_steps=2, latent=2, code_weighting=0)
    exact = fit_prior(two_clusters(n=100), PriorConfig(fit_steps=7, autoencoder_steps=5, **common))
    assert exact.steps_taken == ({"flow": 7} if kind == "flow" else {"autoencoder": 5, "flow": 7})
    # A budget of 6 ms cannot hold a million steps: the clock ends each stage.
    timed = fit_prior(two_clusters(n=100), PriorConfig(fit_steps=10**6, autoencoder_steps=10**6, max_minutes=1e-4,
                                                       **common))
    assert all(taken < 10**6 for taken in timed.steps_taken.values()), timed.steps_taken
    assert torch.isfinite(timed.sample(4, seed=0)).all()


def test_adaln_velocity_field_starts_at_zero_and_learns_a_time_dependent_field():
    torch.manual_seed(0)
    field = AdaLNVelocityField(d=3, width=32, depth=2)
    y, t = torch.randn(16, 3), torch.rand(16)
    assert torch.equal(field(y, t), torch.zeros(16, 3))  # zero-initialised head and gates
    # A field that depends on t alone: v(y, t) = (t, −t, 2t). Input-only conditioning can learn it
    # too; this checks that the modulation path is trained, not just the input layer.
    opt = torch.optim.Adam(field.parameters(), lr=3e-3)
    for _ in range(300):
        t = torch.rand(128)
        target = t[:, None] * torch.tensor([1.0, -1.0, 2.0])
        loss = (field(torch.randn(128, 3), t) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss < 0.01, loss.item()  # the target's mean square is 2/3
    assert field.blocks[0].modulation.weight.abs().sum() > 0


def test_ema_ends_the_fit_at_the_moving_average_of_the_steps(monkeypatch):
    import scatgen.prior as prior_module

    p = torch.nn.Parameter(torch.tensor([5.0, -3.0]))
    seen = []  # the parameter after each optimizer step (work_done runs right after it)
    monkeypatch.setattr(prior_module, "work_done", lambda *a: seen.append(p.detach().clone()))
    cfg = PriorConfig(lr=0.1)
    taken, _ = prior_module.optimise([p], lambda: (p - 1).square().sum(), cfg, steps=40, seconds=0.0,
                                  progress=False, desc="", ema=0.9)
    assert taken == 40 and len(seen) == 40
    average = torch.tensor([5.0, -3.0])
    for i, value in enumerate(seen):
        decay = min(0.9, (1 + i) / (10 + i))
        average = decay * average + (1 - decay) * value
    torch.testing.assert_close(p.detach(), average)
    assert not torch.allclose(p.detach(), seen[-1])  # the average, not the last step


def test_step_precision_auto_times_both_and_keeps_the_faster():
    from scatgen.speed import StepPrecision

    def probe(float32_s: float, bf16_s: float) -> tuple[list[bool], bool]:
        precision = StepPrecision("auto", timed=True, device_type="cpu")
        order = []
        while not precision.settled:
            bf16 = precision.next()
            order.append(bf16)
            precision.timed(bf16, bf16_s if bf16 else float32_s)
        return order, precision.next()

    order, kept = probe(float32_s=0.05, bf16_s=0.03)
    assert order == [False, True] * StepPrecision.PROBE and kept is True
    assert probe(float32_s=0.03, bf16_s=0.24)[1] is False  # a CPU without native bf16
    assert probe(float32_s=0.030, bf16_s=0.029)[1] is False  # within the margin: float32, which is exact
    # A fit bound by steps alone gains nothing from speed: float32 throughout, repeatable to the bit.
    assert StepPrecision("auto", timed=False, device_type="cpu").settled
    assert StepPrecision("auto", timed=False, device_type="cpu").next() is False
    assert StepPrecision("bf16", timed=False, device_type="cpu").next() is True
    with pytest.raises(ValueError, match="prior.mixed_precision must be auto, no or bf16"):
        StepPrecision("fp16", timed=True, device_type="cpu", option="prior.mixed_precision")


@pytest.mark.parametrize("mode", ["no", "bf16"])
def test_optimise_runs_its_steps_in_the_precision_asked_for(mode):
    import scatgen.prior as prior_module

    p = torch.nn.Parameter(torch.tensor([5.0, -3.0]))
    w = torch.eye(2)
    seen = []

    def loss() -> torch.Tensor:
        y = torch.nn.functional.linear(p[None], w)  # a matrix product: autocast's bf16 applies to it
        seen.append(y.dtype)
        return (y.float() - 1).square().sum()

    cfg = PriorConfig(lr=0.1, mixed_precision=mode)
    taken, precision = prior_module.optimise([p], loss, cfg, steps=300, seconds=0.0, progress=False, desc="")
    assert taken == 300 and precision.next() is (mode == "bf16")
    assert set(seen) == {torch.bfloat16 if mode == "bf16" else torch.float32}
    assert p.dtype == torch.float32  # the parameters stay float32: autocast only computes in bf16
    torch.testing.assert_close(p.detach(), torch.ones(2), atol=0.05, rtol=0)  # from 5 and −3


def test_flow_saved_before_the_conditioning_setting_loads_as_input(tmp_path):
    import json

    from safetensors.torch import save_file

    old = FlowPrior(d=4, width=8, depth=1, conditioning="input")
    meta = {"kind": "flow", "settings": {k: v for k, v in old.settings().items() if k != "conditioning"}}
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(path),
              metadata={"scatgen_prior": json.dumps(meta)})
    loaded = load_prior(path)
    assert loaded.conditioning == "input"
    assert torch.equal(loaded.sample(4, seed=2), old.sample(4, seed=2))


def test_latent_flow_autoencoder_width_is_its_own_and_old_priors_load_with_the_flows(tmp_path):
    import json

    from safetensors.torch import save_file

    cfg = PriorConfig(kind="latent_flow", width=16, autoencoder_width=24, depth=1, fit_steps=5, sample_steps=2,
                      latent=2, autoencoder_steps=5, code_weighting=0)
    prior = fit_prior(two_clusters(n=64), cfg, seed=0)
    assert prior.encoder.inp.out_features == prior.decoder.inp.out_features == 24
    assert prior.velocity.inp.out_features == 16
    loaded = load_prior(save_prior(prior, tmp_path / "new.safetensors"))
    assert loaded.autoencoder_width == 24
    assert torch.equal(loaded.sample(4, seed=1), prior.sample(4, seed=1))
    # A prior saved before the setting existed had one width for both stages.
    old = LatentFlowPrior(d=3, latent=2, width=16, depth=1, sample_steps=2)
    meta = {"kind": "latent_flow", "settings": {k: v for k, v in old.settings().items() if k != "autoencoder_width"}}
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(path),
              metadata={"scatgen_prior": json.dumps(meta)})
    assert load_prior(path).autoencoder_width == 16
    assert torch.equal(load_prior(path).sample(4, seed=2), old.sample(4, seed=2))

class GaussianField(torch.nn.Module):
    """The exact velocity E[x − ε | y_t] for data x ~ N(mean, std²) in every component."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, y, t):
        t = t[:, None]
        var = (1 - t) ** 2 + t**2 * self.std**2
        return self.mean + (t * self.std**2 - (1 - t)) / var * (y - t * self.mean)


@pytest.mark.parametrize("noise", [0.5, 2.0])
def test_sde_sampler_keeps_the_odes_marginals(noise):
    field = GaussianField(mean=3.0, std=0.5)
    start = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    for samples in (integrate(field, start, 0.0, 1.0, 50),
                    integrate_sde(field, start, 200, noise, torch.Generator().manual_seed(1))):
        torch.testing.assert_close(samples.mean(0), torch.full((2,), 3.0), atol=0.05, rtol=0)
        torch.testing.assert_close(samples.std(0), torch.full((2,), 0.5), atol=0.05, rtol=0)
    # The noise corrects a path that has gone wrong: started 2 units off, the ODE ends 2 × std = 1
    # off (the map is affine); the SDE keeps less of the error, the less the more noise it injects.
    shifted = start + 2.0
    ode_error = integrate(field, shifted, 0.0, 1.0, 50).mean() - 3.0
    sde_error = integrate_sde(field, shifted, 200, noise, torch.Generator().manual_seed(1)).mean() - 3.0
    assert abs(ode_error - 1.0) < 0.05
    assert 0 < sde_error < (0.8 if noise == 0.5 else 0.35)


def test_sde_prior_saves_loads_and_samples_identically_per_seed(tmp_path):
    prior = LatentFlowPrior(d=4, latent=2, width=8, depth=1, sample_steps=3, sde_noise=1.0)
    loaded = load_prior(save_prior(prior, tmp_path / "sde.safetensors"))
    assert loaded.sde_noise == 1.0
    assert torch.equal(loaded.sample(6, seed=2), prior.sample(6, seed=2))
    assert not torch.equal(loaded.sample(6, seed=2), loaded.sample(6, seed=3))
    prior.sde_noise = 0.0
    assert not torch.equal(loaded.sample(6, seed=2), prior.sample(6, seed=2))  # the ODE's differ
    with pytest.raises(ValueError, match="sde_noise must be a finite number >= 0"):
        FlowPrior(d=4, width=8, depth=1, sde_noise=-1.0)

def test_bad_conditioning_and_ema_are_one_line_errors():
    from scatgen.config import Config, validate

    with pytest.raises(ValueError, match="unknown velocity conditioning 'film'.*adaln, input"):
        FlowPrior(d=4, width=8, depth=1, conditioning="film")
    for key, value, message in [("conditioning", "film", "prior.conditioning"), ("ema", 1.0, "prior.ema=1.0"),
                                ("ema", -0.1, "prior.ema=-0.1"), ("ema", math.nan, "prior.ema=nan")]:
        cfg = Config()
        setattr(cfg.prior, key, value)
        with pytest.raises(ValueError, match=message):
            validate(cfg)


def test_guidance_extrapolates_away_from_a_wider_guide():
    # Both fields carry N(0, I) to N(3, σ²) exactly; the guide's σ is wider, as an early fit's is.
    # Guided by it, samples keep the mean and concentrate beyond the field's own spread.
    from scatgen.prior import GuidedField

    field, guide = GaussianField(mean=3.0, std=0.5), GaussianField(mean=3.0, std=1.0)
    start = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    alone = integrate(field, start, 0.0, 1.0, 50)
    guided = integrate(GuidedField(field, guide, 2.0), start, 0.0, 1.0, 50)
    torch.testing.assert_close(guided.mean(0), torch.full((2,), 3.0), atol=0.05, rtol=0)
    assert guided.std(0).max() < 0.9 * alone.std(0).min(), (guided.std(0), alone.std(0))
    torch.testing.assert_close(integrate(GuidedField(field, guide, 1.0), start, 0.0, 1.0, 50), alone)


def test_flow_fit_keeps_its_guide_at_guide_at(monkeypatch):
    import scatgen.prior as prior_module

    torch.manual_seed(0)
    velocity, guide = prior_module.VelocityField(3, 16, 1), prior_module.VelocityField(3, 16, 1)
    states = []  # the field after each optimizer step (work_done runs right after it)
    monkeypatch.setattr(prior_module, "work_done", lambda *a: states.append(
        {k: v.clone() for k, v in velocity.state_dict().items()}))
    cfg = PriorConfig(fit_steps=40, guide_at=0.5)
    prior_module.train_velocity(velocity, two_clusters(n=300), cfg, torch.Generator().manual_seed(0), "cpu",
                                progress=False, desc="", guide=guide)
    assert len(states) == 40
    kept = guide.state_dict()
    assert all(torch.equal(kept[k], states[19][k]) for k in kept)  # the field after 20 of its 40 steps
    assert not all(torch.equal(kept[k], states[-1][k]) for k in kept)


def test_guided_prior_saves_loads_samples_per_seed_and_inverts(tmp_path, fitted_flows):
    codes, _ = fitted_flows
    cfg = PriorConfig(kind="latent_flow", width=32, depth=1, fit_steps=60, autoencoder_steps=60, lr=3e-3,
                      sample_steps=8, latent=4, code_weighting=0.0, sde_noise=1.0, guide_at=0.25, guidance=2.0)
    prior = fit_prior(codes[:500], cfg, seed=0)
    loaded = load_prior(save_prior(prior, tmp_path / "guided.safetensors"))
    assert loaded.guidance == 2.0 and loaded.guide is not None
    assert torch.equal(loaded.sample(6, seed=2), prior.sample(6, seed=2))
    unguided = loaded.sample(6, seed=2)
    loaded.guidance = 1.0
    assert not torch.equal(loaded.sample(6, seed=2), unguided)
    prior.sde_noise = 0.0  # the ODE sampler is guided too
    guided = prior.sample(6, seed=2)
    prior.guidance = 1.0
    assert not torch.equal(prior.sample(6, seed=2), guided)
    # Interpolation and variations follow the field alone: a code inverted through the guided field
    # would not come back along its own path.
    maps = prior.to_noise(codes[:32]), prior.vary(codes[:4], 0.5, seed=1)
    prior.guidance = 2.0
    noise, residual = prior.to_noise(codes[:32])
    assert torch.equal(noise, maps[0][0]) and torch.equal(prior.vary(codes[:4], 0.5, seed=1), maps[1])
    back = prior.from_noise(noise, residual)
    assert ((back - codes[:32]).norm(dim=1) / codes[:32].norm(dim=1)).max() <= 1e-3
    # A prior saved without a guide reads as before: no guide settings in its file.
    assert "guided" not in LatentFlowPrior(d=4, latent=2, width=8, depth=1).settings()


def test_bad_guidance_is_a_one_line_error():
    from scatgen.config import Config, validate

    with pytest.raises(ValueError, match="guidance 2 needs the flow's guide.*prior.guide_at > 0.*fit-prior"):
        FlowPrior(d=4, width=8, depth=1, guidance=2.0)
    with pytest.raises(ValueError, match="guidance must be a finite number >= 1"):
        FlowPrior(d=4, width=8, depth=1, guided=True, guidance=0.5)
    for settings, message in [({"guidance": 2.0}, r"prior.guidance=2.0 guides .* set prior.guide_at"),
                              ({"guide_at": 1.0}, r"prior.guide_at=1.0 must be in \[0, 1\)"),
                              ({"guide_at": 0.25, "guidance": 0.5}, "prior.guidance=0.5 must be a finite number >= 1"),
                              ({"guide_at": 0.25, "guidance": math.inf}, "prior.guidance=inf must be")]:
        cfg = Config()
        for key, value in settings.items():
            setattr(cfg.prior, key, value)
        with pytest.raises(ValueError, match=message):
            validate(cfg)
