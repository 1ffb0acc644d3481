"""Issue 21: nothing silent, nothing lost. Every input kind at every entry point is either used as
documented or refused in one line that names the fix, before the work; SIGTERM stops training
as Ctrl-C does."""

import errno
import json
import os
import signal
import warnings

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import scatgen
import scatgen.cli as commands
from conftest import ROOT, as_args, run_script, tiny_overrides
from scatgen.checks import ImageRangeWarning
from scatgen.config import YAML_MAX_VALUES, load_config
from scatgen.data.folder import ImageFolderDataset
from scatgen.training import Trainer, TrainingStopped
from signal_points import popen_signalled

CONFIG = str(ROOT / "configs" / "polygons.yaml")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def pipe(run_dir):
    return scatgen.load(run_dir)


@pytest.fixture(scope="module")
def images(pipe):
    return pipe.sample(4, seed=0, refine=0)  # in [-1, 1]


def cli(capsys, *argv):
    """Run a sample.py command in this process: (exit status, stderr)."""
    try:
        status = commands.use(list(argv), prog="sample.py")
    except SystemExit as e:  # argparse
        status = e.code
    return status, capsys.readouterr().err


def no_work(monkeypatch):
    """Make loading the model fail loudly: a check that runs after it came too late."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")
    monkeypatch.setattr(commands.scatgen, "load", refuse)


def no_encoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("encoding started before the refusal")
    monkeypatch.setattr("scatgen.training.prepare_codes", refuse)


# 1. image range ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_images_outside_minus_one_one_are_refused_uint8_converted_unit_range_warned(pipe, images):
    codes = pipe.encode(images)
    as_255 = (images + 1) * 127.5
    for call in (pipe.encode, pipe.reconstruct):
        with pytest.raises(ValueError, match=r"must lie in \[-1, 1\].*0–255 values: pass images / 127.5 - 1"):
            call(as_255)
    as_uint8 = as_255.round().to(torch.uint8)  # explicit uint8 is converted as the datasets convert
    torch.testing.assert_close(pipe.encode(as_uint8), pipe.encode(as_uint8.float() / 127.5 - 1))
    assert pipe.reconstruct(as_uint8, refine=0).shape == images.shape
    with pytest.warns(ImageRangeWarning, match=r"ToTensor, pass images \* 2 - 1"):
        pipe.encode((images + 1) / 2)
    with pytest.warns(ImageRangeWarning):
        pipe.reconstruct((images + 1) / 2, refine=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # correct input: no warning
        torch.testing.assert_close(pipe.encode(images), codes)
    with pytest.raises(TypeError, match="uint8 images"):
        pipe.encode(as_255.long())


# 2. folder datasets with symlinks -----------------------------------------------------------------------------

def _pictures(folder, n, shade=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 7 % 256, shade, 90)).save(folder / f"{i:03d}.png")


@pytest.mark.parametrize("mode", ["hash", "folders"])
def test_a_linked_file_is_used_once_in_one_split(tmp_path, mode):
    root = tmp_path / "root"
    if mode == "hash":
        _pictures(root / "real", 30)
        real = sorted((root / "real").iterdir())
        (root / "links").mkdir()
        (root / "z-hard").mkdir()
        for p in real:  # two more names for every file: a symlink and a hard link
            os.symlink(p, root / "links" / p.name)
            os.link(p, root / "z-hard" / p.name)
    else:
        _pictures(root / "train", 30)
        _pictures(root / "test", 6, shade=200)
        for p in sorted((root / "train").iterdir())[:9]:  # test/ reaches 9 train images too
            os.symlink(p, root / "test" / f"link-{p.name}")
        os.symlink(root / "train" / "000.png", root / "train" / "dup.png")
    with pytest.warns(UserWarning, match="symlinks or hard links to files already listed"):
        splits = {s: ImageFolderDataset(root, s, 8, test_fraction=0.3, split_mode=mode) for s in ("train", "test")}
    inodes = {s: [os.stat(p).st_ino for p in d.files] for s, d in splits.items()}
    for s in inodes:
        assert len(inodes[s]) == len(set(inodes[s])), f"a file appears twice in {s}"
    assert not set(inodes["train"]) & set(inodes["test"]), "a file is in both splits"
    assert len(inodes["train"]) + len(inodes["test"]) == (30 if mode == "hash" else 36)
    if mode == "hash":  # the real name is kept, so links never move a file between splits
        assert all("real" in p.parts for d in splits.values() for p in d.files)


# 3. sample --individual names ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_individual_samples_of_different_settings_do_not_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(capsys, "sample", str(run_dir), "--n", "3", "--refine", "0", "--individual", "--out", str(out))[0] == 0
    first = {p.name: p.read_bytes() for p in out.glob("sample-*.png")}
    assert cli(capsys, "sample", str(run_dir), "--n", "3", "--refine", "0", "--individual", "--prior", "normal",
               "--temperature", "0.5", "--out", str(out))[0] == 0
    files = {p.name: p.read_bytes() for p in out.glob("sample-*.png")}
    assert len(files) == 6 and all(files[name] == data for name, data in first.items())
    assert "sample-normal-refine0-seed0-t0.5-00002.png" in files


@pytest.mark.slow
def test_sample_sde_noise_switches_the_priors_sampler_for_the_command_only(run_dir, tmp_path, capsys):
    from scatgen.prior import load_prior

    saved = (run_dir / "model" / "priors" / "flow.safetensors").read_bytes()
    outs = {}
    for noise in ("0", "1"):
        out = tmp_path / noise
        assert cli(capsys, "sample", str(run_dir), "--n", "4", "--refine", "0", "--sde-noise", noise,
                   "--out", str(out))[0] == 0
        [grid_file] = out.glob(f"samples-flow-refine0-seed0-t1-sde{noise}.png")
        outs[noise] = grid_file.read_bytes()
    assert outs["0"] != outs["1"]
    assert (run_dir / "model" / "priors" / "flow.safetensors").read_bytes() == saved
    assert load_prior(run_dir / "model" / "priors" / "flow.safetensors").sde_noise == 0
    status, err = cli(capsys, "sample", str(run_dir), "--sde-noise", "-1", "--out", str(tmp_path))
    assert status == 2 and "expected a finite number >= 0, got -1" in err
    status, err = cli(capsys, "sample", str(run_dir), "--prior", "normal", "--sde-noise", "1", "--out", str(tmp_path))
    assert status != 0 and "--sde-noise applies to flow and latent_flow priors; 'normal'" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_sample_guidance_needs_a_guide_and_applies_to_the_command_only(run_dir, tmp_path, capsys):
    import shutil

    from scatgen.bundle import find_bundle
    from scatgen.prior import load_prior

    status, err = cli(capsys, "sample", str(run_dir), "--guidance", "2", "--out", str(tmp_path))
    assert status == 1 and "guidance 2 needs the flow's guide" in err and "prior.guide_at=0.25" in err, err
    assert len(err.strip().splitlines()) == 1
    status, err = cli(capsys, "sample", str(run_dir), "--guidance", "0.5", "--out", str(tmp_path))
    assert status == 2 and "expected a finite number >= 1, got 0.5" in err
    bundle = tmp_path / "model"
    shutil.copytree(find_bundle(run_dir), bundle)
    assert cli(capsys, "fit-prior", str(bundle), "--kind", "flow", "--set", "prior.fit_steps=4",
               "--set", "prior.guide_at=0.5", "--set", "prior.guidance=2")[0] == 0
    outs = {}
    for weight in ("1", "3"):
        assert cli(capsys, "sample", str(bundle), "--n", "4", "--refine", "0", "--guidance", weight,
                   "--out", str(tmp_path / weight))[0] == 0
        [grid_file] = (tmp_path / weight).glob(f"samples-flow-refine0-seed0-t1-g{weight}.png")
        outs[weight] = grid_file.read_bytes()
    assert outs["1"] != outs["3"]
    assert load_prior(bundle / "priors" / "flow.safetensors").guidance == 2


# 4. duplicated YAML keys --------------------------------------------------------------------------------------

def test_a_duplicated_yaml_key_is_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.01\nrun:\n  seed: 1\ntrain:\n  max_steps: 5\n")
    with pytest.raises(ValueError, match=r"key 'train' appears twice.*lines 1 and 5"):
        load_config(path)
    path.write_text("train:\n  lr: 0.01\n  lr: 0.02\n")
    with pytest.raises(ValueError, match=r"key 'lr' appears twice.*lines 2 and 3"):
        load_config(path)


@pytest.mark.slow
def test_a_yaml_alias_bomb_is_refused_unexpanded_in_one_short_line(tmp_path, monkeypatch):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\ntrain:\n  betas: *i\n")
    result = run_script("train.py", str(tmp_path / "bomb.yaml"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"expand to more than {YAML_MAX_VALUES:,} values" in result.stderr
    assert len(result.stderr) < 400
    # Refused from the parsed nodes, before any of the 9⁹ values is built.
    def no_construction(*args, **kwargs):
        raise AssertionError("the aliases were expanded before the refusal")

    monkeypatch.setattr(yaml.SafeLoader, "construct_document", no_construction)
    with pytest.raises(ValueError, match=f"expand to more than {YAML_MAX_VALUES:,} values"):
        load_config(tmp_path / "bomb.yaml")
    monkeypatch.undo()
    # Below the bound, a wrong value is shown cut short, not whole.
    (tmp_path / "wide.yaml").write_text("train:\n  betas: &a [" + ",".join(["xxxxxxxx"] * 900) + "]\n"
                                        "  lr: *a\n")
    with pytest.raises(ValueError, match="config key 'train.betas': got") as info:
        load_config(tmp_path / "wide.yaml")
    assert len(str(info.value)) < 200


# 5. whitening.d above what the data supports ------------------------------------------------------------------

def test_whitening_d_above_the_train_images_warns_before_encoding(tmp_path, monkeypatch):
    no_encoding(monkeypatch)
    cfg = load_config(None, tiny_overrides(tmp_path, data__num_train=64, whitening__d=100))
    with pytest.warns(UserWarning, match=r"whitening.d=100, but 64 train images span at most 63 directions: "
                                         r"37 code components will be degenerate"):
        with pytest.raises(AssertionError, match="encoding started"):
            Trainer(cfg, progress=False)
    cfg = load_config(None, tiny_overrides(tmp_path, data__num_train=64, whitening__d=63))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(AssertionError, match="encoding started"):
            Trainer(cfg, progress=False)


# 6. NaN or inf ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_nonfinite_codes_and_pixels_are_refused(pipe, images):
    codes = pipe.encode(images)
    for bad in (float("nan"), float("inf")):
        z = codes.clone()
        z[1, 3] = bad
        for refine in (0, 2):
            with pytest.raises(ValueError, match=r"NaN or infinite value\(s\) \(in item\(s\) \[1\]\)"):
                pipe.decode(z, refine=refine)
        x = images.clone()
        x[2, 0, 5, 5] = bad
        for call in (pipe.encode, pipe.reconstruct):
            with pytest.raises(ValueError, match=r"NaN or infinite value\(s\) \(in item\(s\) \[2\]\)"):
                call(x)
        with pytest.raises(ValueError, match="NaN or infinite"):
            pipe.interpolate(z[1], codes[0], steps=3, refine=0)


# 7. decode(dims=...) -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_known_must_be_a_count_of_components(pipe):
    codes = pipe.random_codes(2, seed=0)
    for bad in (-1, pipe.d + 1):
        with pytest.raises(ValueError, match=rf"dims .* must be in \[0, {pipe.d}\]"):
            pipe.decode(codes, refine=1, dims=bad)
    with pytest.raises(TypeError, match="dims .* whole number"):
        pipe.decode(codes, refine=1, dims=2.5)
    assert pipe.decode(codes, refine=1, dims=pipe.d).shape == (2, 3, 32, 32)


# output paths, the cache folder and --inception: checked before the work ------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("command", ["sample", "reconstruct", "evaluate", "interpolate", "vary", "atoms"])
def test_an_unusable_out_is_one_line_before_the_work(run_dir, tmp_path, capsys, monkeypatch, command):
    no_work(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    extra = {"interpolate": ["--a", "test:0", "--b", "test:1"], "vary": ["--image", "test:0"]}.get(command, [])
    for out, message in ((blocker, "a file is in the way of a folder; choose another --out"),
                         (blocker / "sub", "a part of the path is a regular file; choose another --out")):
        status, err = cli(capsys, command, str(run_dir), *extra, "--out", str(out))
        assert status == 1 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_a_read_only_run_folder_is_one_line_before_the_work(run_dir, capsys, monkeypatch):
    # Tests run as root, to whom chmod'ed folders stay writable: the file system's answer is simulated.
    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    no_work(monkeypatch)
    monkeypatch.setattr(commands, "writable_folder", read_only)
    for argv in (["evaluate", str(run_dir)], ["fit-prior", str(run_dir), "--kind", "gmm"],
                 ["sample", str(run_dir)]):
        status, err = cli(capsys, *argv)
        assert status == 1 and "Read-only file system" in err and "on a writable file system" in err, err


@pytest.mark.slow
def test_fit_prior_set_malformed_settings_are_one_line_before_the_work(run_dir, capsys, monkeypatch):
    no_work(monkeypatch)
    for setting, message in (("latent=16", "expected prior.FIELD=VALUE"), ("train.lr=1e-3", "expected prior.FIELD=VALUE"),
                             ("prior.latent", "expected prior.FIELD=VALUE"), ("prior.kind=gmm", "--kind")):
        status, err = cli(capsys, "fit-prior", str(run_dir), "--set", setting)
        assert status == 2 and message in err and err.strip().splitlines()[-1].startswith("sample.py fit-prior: error"), err


@pytest.mark.slow
def test_fit_prior_set_changes_this_fit_and_checks_values_against_the_bundle(run_dir, tmp_path, capsys):
    import shutil

    from scatgen.bundle import find_bundle
    from scatgen.prior import load_prior

    bundle = tmp_path / "model"
    shutil.copytree(find_bundle(run_dir), bundle)
    # The tiny run's codes have d = 32: a latent of 32 is no compression, and the config's check says so.
    for setting, message in (("prior.latent=32", "prior.latent=32 must be below whitening.d=32"),
                             ("prior.latnet=4", "unknown config key 'prior.latnet'")):
        status, err = cli(capsys, "fit-prior", str(bundle), "--kind", "latent_flow", "--set", setting)
        assert status == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (bundle / "priors" / "latent_flow.safetensors").exists()
    status, err = cli(capsys, "fit-prior", str(bundle), "--kind", "latent_flow", "--set", "prior.latent=4",
                      "--set", "prior.autoencoder_steps=3", "--set", "prior.fit_steps=3", "--set", "prior.sde_noise=0.5")
    assert status == 0, err
    prior = load_prior(bundle / "priors" / "latent_flow.safetensors")
    assert (prior.latent, prior.sde_noise) == (4, 0.5)


@pytest.mark.slow
def test_an_unwritable_cache_folder_has_a_way_out(run_dir, tmp_path, capsys):
    bundle = tmp_path / "model"
    import shutil

    from scatgen.bundle import find_bundle
    from scatgen.integrity import update_manifest

    shutil.copytree(find_bundle(run_dir), bundle)
    (tmp_path / "file").write_text("x")
    config = bundle / "config.yaml"
    config.write_text(config.read_text().replace(f"cache_dir: {run_dir.parent / 'cache'}",
                                                 f"cache_dir: {tmp_path / 'file' / 'cache'}"))
    update_manifest(bundle, "config.yaml")  # as a bundle trained on another machine
    status, err = cli(capsys, "reconstruct", str(bundle), "--n", "2", "--refine", "0", "--out", str(tmp_path / "o"))
    assert status == 1 and "--cache-dir" in err and "file" in err, err
    status, err = cli(capsys, "reconstruct", str(bundle), "--n", "2", "--refine", "0", "--out", str(tmp_path / "o"),
                      "--cache-dir", str(tmp_path / "mycache"))
    assert status == 0, err
    assert (tmp_path / "o" / "reconstructions.json").is_file()


@pytest.mark.slow
def test_a_missing_inception_file_is_reported_first(run_dir, pipe, tmp_path, capsys, monkeypatch):
    from scatgen import evaluation

    def late(*args, **kwargs):
        raise AssertionError("reconstruction started before the check")

    monkeypatch.setattr(evaluation, "reconstruction_metrics", late)
    with pytest.raises(FileNotFoundError, match="Inception weights not found"):
        evaluation.evaluate(pipe, inception=str(tmp_path / "missing.pt"), progress=False)
    no_work(monkeypatch)
    status, err = cli(capsys, "evaluate", str(run_dir), "--inception", str(tmp_path / "missing.pt"),
                      "--out", str(tmp_path / "o"))
    assert status == 1 and "--inception" in err and "is not a file" in err


# API types ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_codes_of_other_types(pipe):
    codes = pipe.random_codes(2, seed=0)
    reference = pipe.decode(codes, refine=0)
    torch.testing.assert_close(pipe.decode(codes.double(), refine=0), reference)
    assert pipe.decode(codes.half(), refine=0).dtype == torch.float32
    for bad, message in ((codes.long(), "floating-point tensor, got dtype torch.int64"),
                         (codes > 0, "floating-point tensor, got dtype torch.bool"),
                         (codes.numpy(), r"got a numpy.ndarray; convert it with torch.from_numpy"),
                         (codes.tolist(), "got a list")):
        with pytest.raises(TypeError, match=message):
            pipe.decode(bad, refine=0)


@pytest.mark.slow
def test_counts_and_seeds_of_other_types(pipe):
    with pytest.raises(TypeError, match="number of samples n must be a whole number, got 2.5"):
        pipe.sample(2.5)
    with pytest.raises(TypeError, match="steps .* must be a whole number"):
        pipe.interpolate(pipe.random_codes(1)[0], pipe.random_codes(1, seed=1)[0], steps=2.5)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\^63\)"):
        pipe.sample(2, seed=2**70)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        pipe.random_codes(2, seed=-1)
    with pytest.raises(TypeError, match="temperature must be a number"):
        pipe.sample(2, temperature="hot")
    assert pipe.sample(2, seed=np.int64(3), refine=0).shape == (2, 3, 32, 32)  # NumPy integers are integers


@pytest.mark.slow
def test_cli_seeds_beyond_64_bits(run_dir, tmp_path, capsys):
    status, err = cli(capsys, "sample", str(run_dir), "--seed", str(2**70), "--out", str(tmp_path))
    assert status == 2 and "seed must be in [0, 2^63)" in err
    status, err = cli(capsys, "interpolate", str(run_dir), "--a", f"seed:{2**70}", "--b", "seed:1", "--refine", "0",
                      "--out", str(tmp_path))
    assert status == 1 and "seed must be in [0, 2^63)" in err and "Overflow" not in err


# empty batches --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_empty_batches_give_empty_results(pipe):
    none = torch.empty(0, 3, 32, 32)
    assert pipe.encode(none).shape == (0, pipe.d)
    assert pipe.reconstruct(none).shape == (0, 3, 32, 32)
    assert pipe.decode(torch.empty(0, pipe.d), refine=2).shape == (0, 3, 32, 32)


def test_a_folder_run_with_one_test_image_is_refused_before_encoding(tmp_path, monkeypatch):
    _pictures(tmp_path / "data" / "train", 40)
    _pictures(tmp_path / "data" / "test", 1)
    no_encoding(monkeypatch)
    cfg = load_config(None, tiny_overrides(tmp_path, data__name="folder", data__root=tmp_path / "data"))
    with pytest.raises(ValueError, match="test split .* holds 1 image; training needs at least 2"):
        Trainer(cfg, progress=False)
    _pictures(tmp_path / "data" / "test", 2)
    cfg = load_config(None, tiny_overrides(tmp_path, data__name="folder", data__root=tmp_path / "data",
                                           train__batch_size=64))
    with pytest.raises(ValueError, match=r"train.batch_size=64 × 1 process\(es\) exceeds the 40 train images"):
        Trainer(cfg, progress=False)


# devices --------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_devices_that_do_not_exist(run_dir, tmp_path, capsys):
    status, err = cli(capsys, "sample", str(run_dir), "--device", "gpu0", "--out", str(tmp_path))
    assert status == 2 and "unknown device 'gpu0'" in err
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        scatgen.load(run_dir, device="gpu0")
    if not torch.cuda.is_available():
        status, err = cli(capsys, "sample", str(run_dir), "--device", "cuda", "--out", str(tmp_path))
        assert status == 2 and "torch sees no CUDA GPU here" in err
        with pytest.raises(ValueError, match="no CUDA GPU"):
            scatgen.load(run_dir, device="cuda")


# huge outputs ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_huge_outputs_are_refused_or_chunked(run_dir, tmp_path, capsys, monkeypatch):
    no_work(monkeypatch)
    status, err = cli(capsys, "interpolate", str(run_dir), "--a", "seed:0", "--b", "seed:1", "--steps", "100000")
    assert status == 2 and "at most 256" in err
    status, err = cli(capsys, "sample", str(run_dir), "--n", "100000")
    assert status == 2 and "pass --individual" in err
    from scatgen.pictures import grid

    strip = torch.zeros(1, 3, 32, 32).expand(100_000, -1, -1, -1)  # no memory behind it
    with pytest.raises(ValueError, match="too large to build"):
        grid(strip, nrow=100_000)


@pytest.mark.slow
def test_long_sampling_is_chunked_and_shows_progress(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(commands, "SAMPLE_CHUNK", 4)
    monkeypatch.setattr(commands, "GRID_MAX", 6)
    status, err = cli(capsys, "sample", str(run_dir), "--n", "10", "--refine", "0", "--individual",
                      "--out", str(tmp_path))
    assert status == 0, err
    assert len(list(tmp_path.glob("sample-*.png"))) == 10
    pipe = scatgen.load(run_dir)
    expected = pipe.sample(10, refine=0)
    saved = np.asarray(Image.open(tmp_path / "sample-flow-refine0-seed0-t1-00009.png"), dtype=np.float32)
    np.testing.assert_allclose(saved, ((expected[9].permute(1, 2, 0) + 1) * 127.5).numpy(), atol=1)
    from scatgen import pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "PROGRESS_DELAY_S", 0)
    pipe.sample(3, refine=0)
    assert "decoding" in capsys.readouterr().err


# SIGTERM --------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_in_the_loop_is_a_checkpoint_and_a_distinct_stop(tmp_path):
    trainer = Trainer(load_config(None, tiny_overrides(tmp_path)), progress=False)
    trainer._request_stop(signal.SIGTERM, None)  # what the handler does when SIGTERM arrives
    with pytest.raises(TrainingStopped) as info:
        trainer.train()
    assert info.value.signum == signal.SIGTERM and info.value.checkpointed
    assert (tmp_path / "run" / "checkpoints" / "step-0000001").is_dir()


@pytest.mark.slow
def test_sigterm_then_resume_gives_the_straight_run(tmp_path):
    base = dict(train__max_steps=60, train__checkpoint_every=10, train__eval_every=30, train__max_minutes=0)
    straight = tiny_overrides(tmp_path / "a", **base)
    assert run_script("train.py", CONFIG, *as_args(straight), env=ONE_THREAD).returncode == 0
    stopped = tiny_overrides(tmp_path / "b", **base)
    run = tmp_path / "b" / "run"
    # SIGTERM arrives right after the step-10 checkpoint is in place.
    proc = popen_signalled("checkpoint", signal.SIGTERM, "train.py", CONFIG, *as_args(stopped), env=ONE_THREAD)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted by SIGTERM at step" in out and "checkpoint saved" in out and "Traceback" not in err
    step = int(out.split("interrupted by SIGTERM at step ")[1].split(";")[0])
    assert (run / "checkpoints" / f"step-{step:07d}").is_dir() and not (run / "model").exists()
    result = run_script("train.py", CONFIG, *as_args(dict(stopped, **{"run.resume": "latest"})), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = load_file(str(tmp_path / "a/run/model/model.safetensors")), load_file(str(run / "model/model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 60


@pytest.mark.slow
def test_sigterm_outside_the_training_steps_unwinds(tmp_path):
    # During encoding: no checkpoint can exist yet, but the spill file and the lock must not be left behind.
    overrides = tiny_overrides(tmp_path, train__max_steps=3)
    cache = tmp_path / "cache"
    # SIGTERM arrives once the first batch of coefficients is in the spill file.
    proc = popen_signalled("spill", signal.SIGTERM, "train.py", CONFIG, *as_args(overrides), env=ONE_THREAD)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert "stopped by SIGTERM outside the training steps" in err
    assert not list(cache.glob(".spill-*.f32"))


@pytest.mark.slow
def test_sigterm_during_sampling_says_so_and_leaves_no_partial_file(run_dir, tmp_path):
    out = tmp_path / "o"
    # SIGTERM arrives while the 11th picture is being written.
    proc = popen_signalled("sample-write", signal.SIGTERM, "sample.py", "sample", str(run_dir), "--n", "100000",
                           "--individual", "--refine", "0", "--out", str(out), env=ONE_THREAD)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM and "interrupted by SIGTERM" in err and "Traceback" not in err
    assert len(list(out.glob("sample-*.png"))) == 10 and not list(out.glob(".tmp-*"))


def test_config_values_beyond_64_bits_or_not_finite_are_errors():
    with pytest.raises(ValueError, match="config key 'train.max_steps'"):
        load_config(None, {"train.max_steps": str(2**70)})
    with pytest.raises(ValueError, match="whitening.eps=nan must be a finite number"):
        load_config(None, {"whitening.eps": "nan"})


@pytest.mark.slow
def test_probed_edges_of_the_api(pipe, tmp_path):
    z = pipe.random_codes(3, seed=0)
    assert pipe.interpolate_codes(z[:0], z[:0], torch.linspace(0, 1, 4)).shape == (0, 4, pipe.d)
    with pytest.raises(ValueError, match="pairs a\\[i\\] with b\\[i\\]: got 3 and 2 codes"):
        pipe.interpolate_codes(z, z[:2], torch.linspace(0, 1, 4))
    torch.testing.assert_close(pipe.decode(z, refine=np.int64(1)), pipe.decode(z, refine=1))
    with pytest.raises(ValueError, match=r"add the batch dimension with images\[None\]"):
        pipe.encode(torch.zeros(3, 32, 32))
    (tmp_path / "c.yaml").write_text("train: [1, 2]\n")
    with pytest.raises(ValueError, match="config section 'train' must be a mapping of its fields"):
        load_config(tmp_path / "c.yaml")


def test_a_mistyped_run_leaves_no_folder_behind(tmp_path, capsys):
    status, err = cli(capsys, "sample", str(tmp_path / "typo"))
    assert status == 1 and "no model bundle" in err and not (tmp_path / "typo").exists()
