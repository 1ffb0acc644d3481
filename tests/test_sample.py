import json
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import scatgen
from conftest import run_script
from scatgen import inception
from scatgen.data import load_split
from scatgen.evaluation import evaluate, fid_halves, markdown_table
from scatgen.pictures import to_unit

# Every test here reads the session's trained run (conftest.run_dir), which a first test waits for.
pytestmark = pytest.mark.slow


def test_python_api(run_dir):
    pipe = scatgen.load(run_dir)
    assert pipe.d == 32 and pipe.image_size == 32
    samples = pipe.sample(4, seed=1)
    assert samples.shape == (4, 3, 32, 32) and samples.abs().max() <= 1
    assert torch.equal(samples, pipe.sample(4, seed=1))
    assert not torch.equal(samples, pipe.sample(4, seed=2))
    codes = pipe.encode(samples)
    assert codes.shape == (4, 32)
    assert pipe.reconstruct(samples).shape == samples.shape
    strip = pipe.interpolate(codes[0], codes[1], steps=5, spherical=True)
    assert strip.shape == (5, 3, 32, 32)
    # The end points of a linear path are the decoded end codes.
    torch.testing.assert_close(pipe.interpolate(codes[0], codes[1], steps=3)[0], pipe.decode(codes[:1])[0])
    with pytest.raises(ValueError, match=r"\(B, 32\)"):
        pipe.decode(torch.randn(2, 7))
    with pytest.raises(ValueError, match="expected images of shape"):
        pipe.encode(torch.randn(2, 3, 16, 16))


def test_sample_subcommand(run_dir, tmp_path):
    out = tmp_path / "out-sample"
    result = run_script("sample.py", "sample", str(run_dir), "--n", "6", "--seed", "3", "--temperature", "0.7",
                        "--individual", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "samples-flow-refine3-seed3-t0.7.png").is_file()  # the tiny run's prior and refine.steps
    # Enlarged ×4: a grid of 6 images of 32² is 8 columns wide at most, 34 px per cell with padding.
    assert Image.open(out / "samples-flow-refine3-seed3-t0.7.png").size == (4 * (2 + 6 * 34), 4 * 36)
    result = run_script("sample.py", "sample", str(run_dir), "--n", "4", "--prior", "normal", "--refine", "0",
                        "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "samples-normal-refine0-seed0-t1.png").is_file()
    assert len(list(out.glob("sample-flow-refine3-seed3-t0.7-*.png"))) == 6  # named as the grid is


def test_interpolate_subcommand(run_dir, tmp_path):
    Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "red.png")
    result = run_script("sample.py", "interpolate", str(run_dir / "model"), "--a", "test:0", "--b",
                        str(tmp_path / "red.png"), "--steps", "4", "--spherical", "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    assert "centre-cropped and resized" in result.stderr
    assert len(list((tmp_path / "o").glob("interpolation-*.png"))) == 1
    gif = next((tmp_path / "o").glob("interpolation-*.gif"))
    assert Image.open(gif).n_frames == 6  # there and back
    result = run_script("sample.py", "interpolate", str(run_dir), "--a", "seed:1", "--b", "seed:2",
                        "--out", str(tmp_path / "o2"))
    assert result.returncode == 0, result.stderr


def test_reconstruct_subcommand(run_dir, tmp_path):
    result = run_script("sample.py", "reconstruct", str(run_dir), "--split", "test", "--n", "5",
                        "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "reconstructions.json").read_text())
    assert report["refine_steps"] == 3 and len(report["images"]) == 5
    for kind in ("raw", "refined"):
        assert report["mean"][kind]["n"] == 5
        mean_psnr = sum(r[kind]["psnr"] for r in report["images"]) / 5
        assert report["mean"][kind]["psnr"] == pytest.approx(mean_psnr)
    # Rows of originals, G and refined, enlarged ×4: 3 rows of 34 px plus the 2 px border.
    assert Image.open(tmp_path / "reconstructions.png").size == (4 * (2 + 5 * 34), 4 * (2 + 3 * 34))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 50, 50)).save(folder / f"{i}.png")
    result = run_script("sample.py", "reconstruct", str(run_dir), "--folder", str(folder), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "mean over 3" in result.stdout


def test_evaluate_with_a_stand_in_feature_network(run_dir):
    class TinyFeatures(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 3)
            torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))

        def forward(self, x):
            return self.conv(x).relu().mean((2, 3))

    pipe = scatgen.load(run_dir)
    report = evaluate(pipe, num_train=64, num_fid=32, num_memorisation=16, feature_net=TinyFeatures(),
                      progress=False, refine=2)
    assert report["test_reconstruction"]["n"] == 64 and report["train_reconstruction"]["n"] == 64
    assert report["fid"]["n"] == 32
    assert set(report["fid"]["samples"]) == {"normal", "flow"}
    for scores in [*report["fid"]["reconstructions"].values(),
                   *(s for prior in report["fid"]["samples"].values() for s in prior.values())]:
        assert scores["fid"] >= 0 and 0 <= scores["precision"] <= 1 and 0 <= scores["recall"] <= 1
    assert set(report["fid"]["reconstructions"]) == {"raw", "refined"}
    assert report["memorisation"]["flow"]["refined"]["n_samples"] == 16
    assert report["test_reconstruction_refined_fid_images"]["n"] == 32
    assert report["refinement"]["steps"] == 2 and report["refinement"]["seconds_per_64_samples"] > 0
    assert set(report["cycle_error"]) == {"raw", "refined", "prior"}
    table = markdown_table(report)
    assert "test PSNR" in table and "samples, flow prior, refined" in table and "precision" in table
    with pytest.raises(ValueError, match="no 'gmm' prior"):
        evaluate(pipe, num_train=8, num_fid=8, feature_net=TinyFeatures(), progress=False, priors=["gmm"])


def test_evaluate_reconstructs_test_images_that_are_not_its_reference(run_dir, monkeypatch):
    # Scored against a reference that holds its own original, a reconstruction finds that twin
    # among its nearest features, which a prior's sample cannot: the FID rows would not compare.
    pipe = scatgen.load(run_dir)
    reconstructed, scored = [], []
    reconstruct = pipe.reconstruct
    monkeypatch.setattr(pipe, "reconstruct", lambda images, refine=None: reconstructed.append(images)
                        or reconstruct(images, refine=refine))

    class Recording(ChannelStatistics):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scored.append(x)
            return super().forward(x)

    report = evaluate(pipe, num_train=8, num_fid=8, num_memorisation=4, feature_net=Recording(), progress=False,
                      refine=0, priors=["normal"])
    test = torch.stack([image for image in load_split(pipe, "test")])
    assert report["fid"]["n"] == 8 and len(reconstructed) == 1
    assert torch.equal(reconstructed[0], test[8:16])
    assert torch.allclose(scored[0], to_unit(test[:8]))  # the first batch of features: the reference
    assert torch.allclose(scored[1], to_unit(test[8:16]))  # then those images as they are, the data's own score
    assert report["fid"]["real_images"]["fid"] < report["fid"]["samples"]["normal"]["raw"]["fid"]
    assert "| test images 8..16, as they are |" in markdown_table(report)


def test_evaluate_draws_more_polygons_when_the_test_split_is_short_of_twice_n(run_dir, monkeypatch):
    # The run's test split holds 64 polygons; N = 40 needs 80. Polygons are procedural, so the 16
    # more are drawn, and the 64 the split holds come first, unchanged.
    pipe = scatgen.load(run_dir)
    reconstructed = []
    reconstruct = pipe.reconstruct
    monkeypatch.setattr(pipe, "reconstruct", lambda images, refine=None: reconstructed.append(images)
                        or reconstruct(images, refine=refine))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing lowered, so nothing to warn of
        report = evaluate(pipe, num_train=8, num_fid=40, num_memorisation=4, feature_net=ChannelStatistics(),
                          progress=False, refine=0, priors=["normal"])
    split = torch.stack([image for image in load_split(pipe, "test")])
    assert len(split) == 64 and report["fid"]["n"] == 40
    assert torch.equal(reconstructed[0][:24], split[40:64]) and len(reconstructed[0]) == 40
    assert not any(torch.equal(reconstructed[0][24], image) for image in split)
    assert report["test_reconstruction"]["n"] == 64  # PSNR stays on the run's own test split


def test_fid_halves_of_a_finite_split_warn_when_n_is_lowered():
    pipe = SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(name="folder")))
    images = torch.rand(7, 3, 8, 8) * 2 - 1
    with pytest.warns(UserWarning, match=r"FID at N=3, not 5: the test split has 7 readable images.*--num-fid 3"):
        reference, held = fid_halves(pipe, list(images), num_fid=5)
    assert torch.equal(reference, images[:3]) and torch.equal(held, images[3:6])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference, held = fid_halves(pipe, list(images), num_fid=3)
    assert len(reference) == len(held) == 3
    with pytest.raises(ValueError, match="at least 2 readable test images"):
        fid_halves(pipe, list(images[:1]), num_fid=5)


class ChannelStatistics(torch.nn.Module):
    """A stand-in for the FID Inception as a TorchScript file: each channel's mean and spread."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)


def test_evaluate_subcommand_writes_json_and_markdown(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)  # the report goes into the run folder, and run_dir is shared by the session
    inception = tmp_path / "inception.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch>=2.9 deprecates torch.jit.script
        torch.jit.script(ChannelStatistics()).save(str(inception))
    result = run_script("sample.py", "evaluate", str(run), "--num-fid", "8", "--num-train", "32",
                        "--inception", str(inception), timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "evaluation.json").read_text())
    # Weights were given, so FID is computed with them whether or not scatgen[metrics] is installed.
    assert report["fid"]["n"] == 8 and set(report["fid"]["samples"]) == {"normal", "flow"}
    for scores in [*report["fid"]["reconstructions"].values(),
                   *(s for prior in report["fid"]["samples"].values() for s in prior.values())]:
        assert scores["fid"] >= 0 and 0 <= scores["precision"] <= 1
    assert (run / "evaluation.md").read_text() == markdown_table(report)


def test_evaluate_without_inception_weights_skips_fid_and_says_why(run_dir, monkeypatch):
    monkeypatch.setattr(inception, "_find_wheel_weights", lambda: None)  # as without scatgen[metrics]
    report = evaluate(scatgen.load(run_dir), num_train=8, num_fid=8, num_memorisation=4, progress=False,
                      refine=0, priors=["normal"])
    assert report["fid"] == {"skipped": inception.INCEPTION_UNAVAILABLE_MSG}
    assert f"FID, KID, precision and recall: {inception.INCEPTION_UNAVAILABLE_MSG}" in markdown_table(report)
    assert report["test_reconstruction_raw_fid_images"]["n"] == 8  # the rest of the protocol still ran


def test_bad_inputs_give_clear_errors(run_dir, tmp_path):
    out = ["--out", str(tmp_path / "o")]  # not RUN/samples: run_dir is shared by the session
    result = run_script("sample.py", "sample", str(tmp_path / "nowhere"))
    assert result.returncode == 1 and "no model bundle" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "bad.png").write_bytes(b"not an image")
    result = run_script("sample.py", "reconstruct", str(run_dir), "--images", str(tmp_path / "bad.png"), *out)
    assert result.returncode == 1 and "cannot read image" in result.stderr
    result = run_script("sample.py", "interpolate", str(run_dir), "--a", "test:100000", "--b", "test:0", *out)
    assert result.returncode == 1 and "out of range" in result.stderr
    result = run_script("sample.py", "reconstruct", str(run_dir), "--images", str(tmp_path / "missing.png"), *out)
    assert result.returncode == 1 and "not found" in result.stderr
    result = run_script("sample.py", "atoms", str(run_dir), *out)
    assert result.returncode == 1 and "needs a sparse_deconv generator" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["sample", "--n", "0"], "expected an integer >= 1, got 0"),
    (["sample", "--n", "-1"], "expected an integer >= 1, got -1"),
    (["sample", "--nrow", "0"], "expected an integer >= 1, got 0"),
    (["sample", "--temperature", "0"], "expected a finite number > 0"),
    (["sample", "--temperature", "nan"], "expected a finite number > 0"),
    (["sample", "--refine", "-2"], "expected an integer >= 0, got -2"),
    (["reconstruct", "--refine", "x"], "expected an integer >= 0, got 'x'"),
    (["sample", "--prior", "vae"], "invalid choice: 'vae'"),
    (["interpolate", "--a", "seed:1", "--b", "seed:2", "--prior", "kde"], "invalid choice: 'kde'"),
    (["interpolate", "--a", "test:0", "--b", "test:1", "--path", "noise"], "invalid choice: 'noise'"),
    (["vary", "--image", "test:0", "--strength", "-0.5"], "expected a number in [0, 1]"),
    (["vary", "--image", "test:0", "--strength", "abc"], "expected a number in [0, 1], got 'abc'"),
    (["vary", "--image", "test:0", "--n", "0"], "expected an integer >= 1, got 0"),
])
def test_bad_flag_values_are_refused(run_dir, args, message):
    result = run_script("sample.py", args[0], str(run_dir), *args[1:])
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_fit_prior_adds_a_prior_that_sampling_can_pick(run_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    result = run_script("sample.py", "sample", str(run), "--prior", "gmm", "--n", "2")
    assert result.returncode == 1 and "fit-prior RUN --kind gmm" in result.stderr
    result = run_script("sample.py", "fit-prior", str(run), "--kind", "gmm")
    assert result.returncode == 0, result.stderr
    assert (run / "model" / "priors" / "gmm.safetensors").is_file()
    assert set(scatgen.load(run).priors) == {"normal", "flow", "gmm"}
    result = run_script("sample.py", "sample", str(run), "--prior", "gmm", "--n", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "samples-gmm-refine3-seed0-t1.png").is_file()


def test_vary_and_interpolate_through_the_prior_write_pictures(run_dir, tmp_path):
    result = run_script("sample.py", "vary", str(run_dir), "--image", "test:2", "--strength", "0.4", "--n", "3",
                        "--refine", "0", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "variations-flow-s0.4-seed0-test2.png").is_file()
    result = run_script("sample.py", "interpolate", str(run_dir), "--a", "test:0", "--b", "test:1", "--steps", "3",
                        "--path", "prior", "--refine", "0", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "interpolation-prior-test0-test1.png").is_file()
    result = run_script("sample.py", "interpolate", str(run_dir), "--a", "test:0", "--b", "test:1", "--path", "prior",
                        "--spherical", "--out", str(tmp_path))
    assert result.returncode == 1 and "use it with path='code'" in result.stderr and "Traceback" not in result.stderr
