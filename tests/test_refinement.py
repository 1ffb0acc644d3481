import math
from dataclasses import replace

import pytest
import torch
from torch import nn

import scatgen
from scatgen.data import load_split
from scatgen.config import RefineConfig, check_refine
from scatgen.data.polygons import PolygonDataset
from scatgen.metrics import psnr
from scatgen.pictures import to_unit
from scatgen.filter_bank import channel_orders
from scatgen.refinement import (
    Surface,
    TV_EPSILON,
    code_objective,
    descend,
    image_objective,
    order_balance,
    refine_decodings,
    refine_reconstructions,
    total_variation,
)
from scatgen.scattering import Scattering


@pytest.fixture(scope="module")
def pipe(run_dir):
    return scatgen.load(run_dir)


@pytest.fixture(scope="module")
def batch(pipe):
    test = load_split(pipe, "test")
    images = torch.stack([test[i] for i in range(6)])
    codes = pipe.encode(images)
    return images, codes, pipe.decode(codes, refine=0)


def energy(pipe, objective, x):
    with torch.no_grad():
        return objective(pipe.scattering(x).reshape(len(x), -1))


@pytest.mark.slow
def test_full_refinement_lowers_its_objective_and_raises_psnr(pipe, batch):
    images, _, start = batch
    # The tiny run's G gives structureless blobs; from those the plain objective is the faster one
    # (the order balance pays off from a trained G's output: benchmarks/README.md).
    cfg = RefineConfig(steps=30, lr=0.01, balance=0.0)
    refined = refine_reconstructions(pipe.scattering, start, images, cfg)
    with torch.no_grad():
        objective = image_objective(pipe.scattering(images).reshape(len(images), -1))
    before, after = energy(pipe, objective, start), energy(pipe, objective, refined)
    assert (after < 0.5 * before).all()
    gain = psnr(to_unit(refined), to_unit(images)) - psnr(to_unit(start), to_unit(images))
    assert gain.mean() > 1.0
    assert refined.abs().max() <= 1


@pytest.mark.slow
def test_code_refinement_lowers_its_objective_and_the_cycle_error(pipe, batch):
    _, codes, start = batch
    for optimizer in ("adam", "lbfgs"):
        cfg = RefineConfig(steps=30, lr=0.01, optimizer=optimizer)
        refined = refine_decodings(pipe.encoder, start, codes, cfg)
        with torch.no_grad():
            start_coeffs = pipe.scattering(start).reshape(len(start), -1)
        objective = code_objective(pipe.whitening, codes, start_coeffs, weighting=0.0, anchor=1.0)
        assert (energy(pipe, objective, refined) < energy(pipe, objective, start)).all(), optimizer
        cycle = lambda x: ((pipe.encode(x) - codes).norm(dim=1) / codes.norm(dim=1)).mean()  # noqa: E731
        assert cycle(refined) < cycle(start), optimizer


@pytest.mark.slow
def test_anchor_holds_the_coefficients_the_code_does_not_fix(pipe, batch):
    _, codes, start = batch
    w = pipe.whitening

    def off_span(x):
        with torch.no_grad():
            c = pipe.scattering(x).reshape(len(x), -1) - w.mean
            return c - (c @ w.basis) @ w.basis.T

    drift = {}
    for anchor in (0.0, 10.0):
        cfg = RefineConfig(steps=30, lr=0.01, anchor=anchor)
        refined = refine_decodings(pipe.encoder, start, codes, cfg)
        drift[anchor] = (off_span(refined) - off_span(start)).norm(dim=1).mean()
    assert drift[10.0] < drift[0.0]


@pytest.fixture(scope="module")
def polygons():
    """8 polygons at 32², a blurred copy of each as the start, and their scattering (J=3, L=4)."""
    scattering = Scattering(3, 32, 4)
    polygons = PolygonDataset("train", image_size=32, seed=0, length=8)
    images = torch.stack([polygons[i] for i in range(8)])
    blurred = nn.functional.avg_pool2d(nn.functional.pad(images, (1, 1, 1, 1), mode="reflect"), 3, 1)
    with torch.no_grad():
        target = scattering(images).reshape(len(images), -1)
    return scattering, images, blurred, target


def test_order_balance_weighs_each_images_orders_by_their_energy(polygons):
    scattering, images, _, target = polygons
    assert order_balance(scattering, target, 0.0) is None
    orders = channel_orders(3, 4)
    per_order = lambda t: [t.reshape(len(t), 3, -1, 16)[:, :, orders == m].flatten(1) for m in range(3)]  # noqa: E731
    weights = order_balance(scattering, target, 1.0)
    # balance 1: each order's weighted mean square equals the order-0 one, image by image.
    energies = [(c.square() * w).mean(1) for c, w in zip(per_order(target), per_order(weights))]
    torch.testing.assert_close(energies[1], energies[0])
    torch.testing.assert_close(energies[2], energies[0])
    for w in per_order(weights):  # one weight per image and order
        assert torch.equal(w, w[:, :1].expand_as(w))
    half = order_balance(scattering, target, 0.5)
    torch.testing.assert_close(half, weights.sqrt())
    torch.testing.assert_close(order_balance(scattering, target[2:3], 0.5), half[2:3])  # its batch plays no part
    with torch.no_grad():
        flat = scattering(torch.stack([torch.zeros(3, 32, 32), torch.full((3, 32, 32), 0.5)])).reshape(2, -1)
    w = order_balance(scattering, flat, 0.5)
    assert torch.isfinite(w).all() and torch.equal(w[0], torch.ones_like(w[0]))  # no energy at all: unweighted
    assert w[1].max() <= 1e3 * (1 + 1e-6)  # orders 1 and 2 empty: capped at (10⁶)^0.5


def test_balanced_refinement_converges_faster_than_plain(polygons):
    scattering, images, blurred, target = polygons
    gain = {}
    for balance in (0.0, 0.5):
        objective = image_objective(target, order_balance(scattering, target, balance))
        refined = descend(scattering, blurred, objective, RefineConfig(steps=15, balance=balance))
        gain[balance] = (psnr(to_unit(refined), to_unit(images)) - psnr(to_unit(blurred), to_unit(images))).mean()
    assert gain[0.0] > 1.0  # both descend
    assert gain[0.5] > gain[0.0] + 0.5  # the minimiser is the same; the balanced one gets nearer in 15 evaluations


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf")])
def test_a_bad_balance_is_a_one_line_error(value):
    with pytest.raises(ValueError, match="balance >= 0"):
        check_refine(RefineConfig(balance=value))


def test_total_variation_on_constructed_images():
    flat = torch.zeros(2, 3, 8, 8)
    torch.testing.assert_close(total_variation(flat), torch.zeros(2), atol=1e-6, rtol=0)
    edge = flat.clone()
    edge[:, :, :, 4:] = 1.0  # one vertical edge of height 1 in all 3 channels, 8 rows
    expected = 8 * (math.sqrt(3 + TV_EPSILON**2) - TV_EPSILON)
    torch.testing.assert_close(total_variation(edge), torch.full((2,), expected))
    # A horizontal edge costs what the vertical one does.
    torch.testing.assert_close(total_variation(edge.transpose(2, 3)), total_variation(edge))


def test_total_variation_charges_colour_fringes_more_than_an_aligned_edge():
    aligned = torch.zeros(1, 3, 8, 8)
    aligned[:, :, :, 4:] = 1.0
    fringed = torch.zeros(1, 3, 8, 8)
    for c in range(3):  # the same jumps, each channel's one pixel further right
        fringed[:, c, :, 3 + c:] = 1.0
    assert total_variation(fringed) > 1.5 * total_variation(aligned)  # 3 against sqrt(3) per row


@pytest.mark.slow
def test_tv_regulariser_smooths(pipe, batch):
    images, _, start = batch
    noisy = (start + 0.1 * torch.randn(start.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    with torch.no_grad():
        objective = image_objective(pipe.scattering(images).reshape(len(images), -1))
    plain = descend(pipe.scattering, noisy, objective, RefineConfig(steps=10, lr=0.01))
    smooth = descend(pipe.scattering, noisy, objective, RefineConfig(steps=10, lr=0.01, tv=10.0))
    assert total_variation(smooth).mean() < total_variation(plain).mean()


def plain_and_smooth(run_dir, key):
    """Two pipelines of the tiny run, refining 10 steps with refine.<key> = 0 and 5."""
    pipes = scatgen.load(run_dir), scatgen.load(run_dir)
    for p, weight in zip(pipes, (0.0, 5.0)):
        p.cfg = replace(p.cfg, refine=replace(p.cfg.refine, steps=10, **{key: weight}))
    return pipes


@pytest.mark.slow
def test_drawn_codes_refine_with_sample_tv_and_image_codes_without(run_dir, batch):
    images, codes, _ = batch
    plain, smooth = plain_and_smooth(run_dir, "sample_tv")
    # Samples, variations and interpolation paths take refine.sample_tv, and come out smoother.
    for draw in (lambda p: p.sample(4, seed=3), lambda p: p.vary(codes[0], 0.5, n=3, seed=1),
                 lambda p: p.interpolate(codes[0], codes[1], steps=3)):
        assert total_variation(draw(smooth)).mean() < total_variation(draw(plain)).mean()
    # An image's own code does not: decode, reconstruct and vary at strength 0 are unchanged.
    assert torch.equal(smooth.decode(codes), plain.decode(codes))
    assert torch.equal(smooth.reconstruct(images[:2]), plain.reconstruct(images[:2]))
    # (within L-BFGS's amplification of batched float sums over 10 steps; TV 5 moves pixels by far more)
    torch.testing.assert_close(smooth.vary(codes[0], 0.0, n=2), smooth.decode(codes[:1]).expand(2, -1, -1, -1),
                               atol=1e-3, rtol=0)
    torch.testing.assert_close(plain.decode(codes, tv=5.0), smooth.decode(codes, tv=5.0))
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="tv must be a finite number >= 0"):
            plain.decode(codes, tv=bad)
    with pytest.raises(ValueError, match="tv, sample_tv, latent_spread and balance >= 0"):
        check_refine(RefineConfig(sample_tv=-1.0))


@pytest.mark.slow
def test_refine_tv_acts_on_code_decodes_and_not_on_reconstructions(run_dir, batch):
    images, codes, _ = batch
    plain, smooth = plain_and_smooth(run_dir, "tv")
    assert total_variation(smooth.decode(codes)).mean() < total_variation(plain.decode(codes)).mean()
    # The full S_J x determines a reconstruction's target; TV would only pull it away.
    assert torch.equal(smooth.reconstruct(images[:2]), plain.reconstruct(images[:2]))


@pytest.mark.slow
def test_pipeline_refine_argument(pipe, batch):
    images, codes, start = batch
    assert torch.equal(pipe.decode(codes, refine=0), start)
    refined = pipe.decode(codes, refine=2)
    assert refined.shape == start.shape and not torch.equal(refined, start)
    # None means the bundle's refine.steps (3 in the tiny config).
    torch.testing.assert_close(pipe.decode(codes), pipe.decode(codes, refine=pipe.cfg.refine.steps))
    assert pipe.reconstruct(images, refine=2).shape == images.shape
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="refine must be a number of steps >= 0"):
            pipe.decode(codes, refine=bad)
    with pytest.raises(ValueError, match="refine.optimizer"):
        refine_decodings(pipe.encoder, start, codes, replace(pipe.cfg.refine, optimizer="sgd"))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["images", "codes"])
def test_a_refined_image_does_not_depend_on_its_batch(pipe, batch, target):
    """Each image has its own budget of evaluations: one that backtracks costs the others nothing."""
    images, codes, start = batch
    cfg = replace(pipe.cfg.refine, steps=10)

    def refine(batch_size: int) -> torch.Tensor:
        settings = replace(cfg, batch_size=batch_size)
        if target == "images":
            return refine_reconstructions(pipe.scattering, start, images, settings)
        return refine_decodings(pipe.encoder, start, codes, settings)

    together, alone = (psnr(to_unit(refine(size)), to_unit(images)) for size in (len(images), 1))
    # Batched arithmetic differs in its last bits, which L-BFGS amplifies a little; a shared budget
    # cost the batched images whole iterations (about 1 dB at 10-15 evaluations).
    assert (together - alone).abs().max() < 0.05


def test_a_surface_starts_at_the_drawn_code_and_prices_a_move():
    decode = nn.Linear(3, 5)
    states = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    surface = Surface(states, decode, spread=2.0)
    torch.testing.assert_close(surface.shift(states, None), torch.zeros(4, 5))  # u = u₀: the target is z
    moved = states[1:3] + 1.0
    torch.testing.assert_close(surface.shift(moved, torch.tensor([1, 2])), decode(moved) - decode(states[1:3]))
    torch.testing.assert_close(surface.cost(moved, torch.tensor([1, 2])), torch.full((2,), 3 / 4))
    assert surface.moved is None  # until a refinement ends


@pytest.fixture(scope="module")
def latent_pipes(run_dir, pipe):
    """Two pipelines of the tiny run that also hold one small latent_flow prior, refining 10 steps
    with refine.latent_spread 0 and 2."""
    from scatgen.config import PriorConfig
    from scatgen.prior import fit_prior

    images = torch.stack([load_split(pipe, "train")[i] for i in range(64)])
    cfg = PriorConfig(kind="latent_flow", width=32, depth=1, latent=4, autoencoder_steps=30, fit_steps=30,
                      sample_steps=4)
    prior = fit_prior(pipe.encode(images), cfg, eigenvalues=pipe.whitening.eigenvalues)
    pipes = []
    for spread in (0.0, 2.0):
        p = scatgen.load(run_dir)
        p.priors["latent_flow"] = prior
        p.cfg = replace(p.cfg, refine=replace(p.cfg.refine, steps=10, latent_spread=spread))
        pipes.append(p)
    return pipes


@pytest.mark.slow
def test_drawn_codes_move_along_a_latent_priors_surface(latent_pipes, batch):
    fixed, moving = latent_pipes
    _, codes, _ = batch
    prior = moving.priors["latent_flow"]
    z = prior.sample(4, seed=2)
    start = moving.decode(z, refine=0)
    cfg = moving.refine_settings()
    with torch.no_grad():
        objective = code_objective(moving.whitening, z, moving.encoder.coefficients(start), cfg.weighting, cfg.anchor)
    for optimizer in ("lbfgs", "adam"):
        surface = Surface(prior.codes_to_state(z).detach(), prior.state_to_codes, cfg.latent_spread)
        x = descend(moving.scattering, start, objective, replace(cfg, optimizer=optimizer), surface=surface)

        def joint(x, u):
            with torch.no_grad():
                coeffs = moving.scattering(x).reshape(len(x), -1)
                return objective(coeffs, None, surface.shift(u, None)) + surface.cost(u, None)

        # x and the latents descend together, and the latents leave u₀.
        assert (joint(x, surface.moved) < joint(start, surface.states)).all(), optimizer
        assert ((surface.moved - surface.states).norm(dim=1) > 1e-3).all(), optimizer
    # sample, vary and interpolate move along the surface; decode of an image's code does not.
    draw = {"sample": lambda p: p.sample(3, seed=1, prior="latent_flow"),
            "vary": lambda p: p.vary(codes[0], 0.5, n=2, prior="latent_flow"),
            "interpolate": lambda p: p.interpolate(codes[0], codes[1], steps=3, prior="latent_flow")}
    for name, f in draw.items():
        assert not torch.allclose(f(moving), f(fixed), atol=1e-3), name
    assert torch.equal(moving.decode(codes[:2]), fixed.decode(codes[:2]))
    # A prior without a latent (the run's flow) refines with its codes held, whatever the spread.
    assert torch.equal(moving.sample(3, seed=1, prior="flow"), fixed.sample(3, seed=1, prior="flow"))
    with pytest.raises(ValueError, match="no 'gmm' prior in this bundle"):
        moving.decode(z, drawn_by="gmm")
    with pytest.raises(ValueError, match="latent_spread and balance >= 0"):
        check_refine(RefineConfig(latent_spread=-1.0))


@pytest.mark.slow
def test_drawn_codes_take_sample_steps_and_image_codes_steps(run_dir, batch):
    _, codes, _ = batch
    split, same = scatgen.load(run_dir), scatgen.load(run_dir)
    split.cfg = replace(split.cfg, refine=replace(split.cfg.refine, steps=2, sample_steps=6))
    same.cfg = replace(same.cfg, refine=replace(same.cfg.refine, steps=6, sample_steps=0))  # 0: as refine.steps
    assert (split.refine_settings().steps, split.refine_settings(drawn=True).steps) == (2, 6)
    assert split.refine_settings(4, drawn=True).steps == 4  # an explicit refine= wins
    assert torch.equal(split.sample(3, seed=1), same.sample(3, seed=1))
    assert torch.equal(split.vary(codes[0], 0.5, n=2), same.vary(codes[0], 0.5, n=2))
    assert not torch.allclose(split.decode(codes[:2]), same.decode(codes[:2]), atol=1e-4)
    off = scatgen.load(run_dir)  # refine.steps 0 turns refinement off for drawn codes too
    off.cfg = replace(off.cfg, refine=replace(off.cfg.refine, steps=0, sample_steps=6))
    assert off.refine_settings(drawn=True).steps == 0
    with pytest.raises(ValueError, match="refine.sample_steps=-1 must be >= 0"):
        check_refine(RefineConfig(sample_steps=-1))
