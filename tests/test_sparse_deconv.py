"""The sparse-deconvolution generator: shapes, unit-norm atoms, pyramid, loss, reporting helpers."""

from __future__ import annotations

import pytest
import torch

from scatgen.cli import atoms_grid, per_scale_psnr, sparsity_statistics
from scatgen.generators import build_generator, generator_config_class
from scatgen.generators.sparse_deconv import LowpassPyramid, SparseDeconvConfig, SparseDeconvGenerator, upsample2

D = 32  # small code dimension keeps the tests fast


def small_cfg(**kw) -> SparseDeconvConfig:
    base = dict(atoms=8, hidden=8, z_channels=4)
    base.update(kw)
    return SparseDeconvConfig(**base)


def make(N: int, J: int, **kw) -> SparseDeconvGenerator:
    torch.manual_seed(0)
    return SparseDeconvGenerator(small_cfg(**kw), code_dim=D, image_size=N, J=J, L=8)


@pytest.mark.parametrize("coder", ["cnn", "lista"])
@pytest.mark.parametrize("N,J", [(32, 3), (32, 4), (64, 4)])
def test_shapes_every_scale(coder: str, N: int, J: int) -> None:
    g = make(N, J, coder=coder, shrink="soft" if coder == "lista" else "relu")
    B = 2
    images, pyramid, alphas = g.generate_with_codes(torch.randn(B, D))
    assert images.shape == (B, 3, N, N)
    assert [tuple(p.shape) for p in pyramid] == [(B, 3, N // 2**j, N // 2**j) for j in range(J, -1, -1)]
    assert [tuple(a.shape) for a in alphas] == [(B, 8, N // 2**j, N // 2**j) for j in range(J, 0, -1)]
    assert all((a >= 0).all() for a in alphas)
    assert images.abs().max() <= 1.0
    assert g.generate(torch.randn(B, D)).shape == (B, 3, N, N)


def test_registry_and_validation() -> None:
    cfg = generator_config_class("sparse_deconv")()
    assert cfg.kind == "sparse_deconv"
    cfg.validate()
    g = build_generator(small_cfg(), code_dim=D, image_size=32, J=3, L=8)
    assert isinstance(g, SparseDeconvGenerator)
    for bad in [dict(coder="ista"), dict(shrink="hard"), dict(atoms=0), dict(atom_size=1),
                dict(lista_iters=-1), dict(scale_weights="linear"), dict(scale_decay=0.0),
                dict(l1_penalty=-1.0), dict(inject="concat"), dict(output="sigmoid")]:
        with pytest.raises(ValueError, match="generator\\."):
            SparseDeconvConfig(**bad).validate()
    with pytest.raises(ValueError):
        SparseDeconvGenerator(small_cfg(), code_dim=D, image_size=36, J=3, L=8)


@pytest.mark.parametrize("k", [3, 4, 5])
def test_atom_sizes_double_exactly(k: int) -> None:
    g = make(32, 3, atom_size=k)
    assert g.generate(torch.randn(2, D)).shape == (2, 3, 32, 32)


def train_step(g, z: torch.Tensor, x: torch.Tensor, opt: torch.optim.Optimizer) -> float:
    """One optimizer step as the trainer takes it, atom renormalisation included."""
    _, loss = g(z, x)
    opt.zero_grad()
    loss.backward()
    opt.step()
    g.after_optimizer_step()
    return loss.item()


@pytest.mark.parametrize("coder", ["cnn", "lista"])
def test_atoms_stay_unit_norm_after_optimizer_steps(coder: str) -> None:
    g = make(32, 3, coder=coder)
    opt = torch.optim.Adam(g.parameters(), lr=5e-2)
    z, x = torch.randn(4, D), torch.rand(4, 3, 32, 32) * 2 - 1
    before = [d.weight.detach().clone() for d in g.dictionaries()]
    for _ in range(4):
        train_step(g, z, x, opt)
        for d in g.dictionaries():
            norms = d.weight.detach().flatten(1).norm(dim=1)  # stored weights, not just the forward view
            torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
            torch.testing.assert_close(d.atoms().flatten(1).norm(dim=1), torch.ones_like(norms), atol=1e-5, rtol=0)
    assert any(not torch.equal(b, d.weight) for b, d in zip(before, g.dictionaries()))  # the atoms did move


def test_sparsity_statistics_known_code() -> None:
    alpha = torch.zeros(2, 4, 3, 5)  # 120 entries, 30 positions
    alpha[0, 0] = 1.0  # 15 positions with 1 active atom
    alpha[1, :2, 0, 0] = 2.0  # 1 position with 2 active atoms
    stats = sparsity_statistics(alpha)
    assert stats["zero_fraction"] == pytest.approx(1 - 17 / 120)
    assert stats["active_atoms_per_position"] == pytest.approx(17 / 30)
    assert sparsity_statistics(torch.zeros(1, 3, 2, 2)) == {"zero_fraction": 1.0, "active_atoms_per_position": 0.0}


@pytest.mark.parametrize("N,J", [(32, 3), (64, 4)])
def test_lowpass_pyramid(N: int, J: int) -> None:
    x = torch.rand(2, 3, N, N) * 2 - 1
    g = make(N, J)
    pyr = g.lowpass_pyramid(x)
    assert [tuple(p.shape) for p in pyr] == [(2, 3, N // 2**j, N // 2**j) for j in range(J, -1, -1)]
    torch.testing.assert_close(pyr[-1], x)  # scale 0 is the image
    const = torch.full((1, 3, N, N), 0.3)
    const[:, 1] = -0.7
    for p in LowpassPyramid(N, J)(const):
        torch.testing.assert_close(p, const[..., : p.shape[-2], : p.shape[-1]], atol=1e-5, rtol=0)
    # low-pass: coarser scales are smoother (smaller variance) than the image
    assert pyr[0].var() < pyr[-2].var() < pyr[-1].var()


def test_lowpass_matches_kymatio_order0() -> None:
    """At scale J the target is the scattering's own order-0 coefficient x∗φ_J."""
    pytest.importorskip("kymatio")
    from scatgen.scattering import Scattering

    N, J = 16, 2
    x = torch.rand(2, 3, N, N)
    s0 = Scattering(J, N, L=8, backend="kymatio")(x).view(2, 3, -1, N // 2**J, N // 2**J)[:, :, 0]
    torch.testing.assert_close(LowpassPyramid(N, J)(x)[0], s0, atol=2e-3, rtol=0)


def test_upsample2_is_grid_exact() -> None:
    x = torch.randn(1, 3, 4, 4)
    up = upsample2(x)
    assert up.shape == (1, 3, 8, 8)
    torch.testing.assert_close(up[..., ::2, ::2], x)
    torch.testing.assert_close(up[..., 1:-1:2, ::2], 0.5 * (x[..., :-1, :] + x[..., 1:, :]))


@pytest.mark.parametrize("kw", [dict(coder="cnn"), dict(coder="lista", shrink="soft", l1_penalty=1e-3),
                                dict(coder="cnn", inject="both", output="tanh", scale_weights="geometric")])
def test_forward_loss_stats_and_gradients(kw: dict) -> None:
    J = 3
    g = make(32, J, **kw)
    z, x = torch.randn(4, D), torch.rand(4, 3, 32, 32) * 2 - 1
    images, none = g(z)
    assert none is None and images.shape == (4, 3, 32, 32)
    for loss_kind in ("l1", "l2"):
        _, loss = g(z, x, loss=loss_kind)
        assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(g.stats) == {f"loss_scale_{j}" for j in range(J + 1)} | {f"sparsity_{j}" for j in range(1, J + 1)}
    assert all(isinstance(v, float) for v in g.stats.values())
    g.zero_grad()
    loss.backward()
    missing = [n for n, p in g.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("coder", ["cnn", "lista"])
def test_tiny_overfit(coder: str) -> None:
    g = make(16, 2, coder=coder)
    torch.manual_seed(1)
    z = torch.randn(8, D)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    x = torch.stack([torch.stack([torch.sin(3 * a * xx + b * yy) for b in (1, 2, 3)]) for a in torch.rand(8)]) * 0.8
    opt = torch.optim.Adam(g.parameters(), lr=3e-3)
    losses = [train_step(g, z, x, opt) for _ in range(20)]
    assert losses[-1] < 0.6 * losses[0]


def test_state_dict_has_no_filter_buffers() -> None:
    g = make(32, 3)
    keys = list(g.state_dict())
    assert not [k for k in keys if "phi" in k or "lowpass" in k]
    assert set(keys) == {n for n, _ in g.named_parameters()}
    g2 = make(32, 3)
    g2.load_state_dict(g.state_dict())  # strict round trip


def test_reporting_helpers() -> None:
    g = make(32, 3, atoms=10, atom_size=4)
    grids = atoms_grid(g)
    assert len(grids) == 3
    for grid in grids:
        assert grid.ndim == 3 and grid.shape[0] == 3 and grid.min() >= 0 and grid.max() <= 1
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    pyr = LowpassPyramid(32, 3)(x)
    assert per_scale_psnr(pyr, pyr) == [float('inf')] * 4
    noisy = [p + 0.1 for p in pyr]  # MSE 0.01 → 10·log10(4 / 0.01)
    assert per_scale_psnr(noisy, pyr) == pytest.approx([26.0206] * 4, abs=1e-3)


def test_train_and_sample_scripts_end_to_end(tmp_path):
    import json

    from conftest import ROOT, as_args, run_script, tiny_overrides

    overrides = tiny_overrides(tmp_path, generator__kind="sparse_deconv", generator__atoms=8,
                               generator__hidden=8, generator__z_channels=4)
    overrides.pop("generator.channels")
    overrides.pop("generator.min_channels")
    result = run_script("train.py", str(ROOT / "configs/polygons-sparse.yaml"), *as_args(overrides))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads((run / "model" / "bundle.json").read_text())["generator"] == "sparse_deconv"
    result = run_script("sample.py", "atoms", str(run), "--out", str(tmp_path / "atoms"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "atoms" / "atoms.json").read_text())
    assert [s["j"] for s in report["scales"]] == [3, 2, 1]
    for scale in report["scales"]:
        assert 0 <= scale["zero_fraction"] <= 1 and scale["atoms"] == 8
        assert (tmp_path / "atoms" / f"atoms-D{scale['j']}.png").is_file()
    result = run_script("sample.py", "sample", str(run), "--n", "4", "--out", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr[-3000:]
