"""Runs that cannot silently go wrong: resume, checkpoints, caches, locks and one-line errors."""

import json
import os
import shutil
import signal
import warnings

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, as_args, run_script, tiny_overrides
from scatgen.bundle import load_bundle
from scatgen.checkpoints import CheckpointWarning, RunDirectoryInUse, resume_conflicts
from scatgen.codes import prepare_codes
from scatgen.coefficients import CoeffSpill, remove_stale_spills
from scatgen.config import config_to_dict, load_config
from scatgen.integrity import CorruptFileError, write_manifest
from scatgen.training import NonFiniteLossError, Trainer, lr_factor
from signal_points import popen_signalled

CONFIG = str(ROOT / "configs" / "polygons.yaml")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # equal thread counts, so that runs compared bit for bit reduce alike


def _flip_bytes(path, offset_from_end=64, n=32):
    data = bytearray(path.read_bytes())
    start = max(0, len(data) - offset_from_end)
    for i in range(start, min(len(data), start + n)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _checkpoints(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


# 1. a resume may change the learning rate, and the change takes effect --------------------------------------

@pytest.mark.slow
def test_resumed_learning_rate_takes_effect(tmp_path):
    first = tiny_overrides(tmp_path, train__max_steps=6)
    Trainer(load_config(None, first), progress=False).train()
    resumed = dict(first, **{"train.lr": "1e-5", "train.max_steps": "12", "run.resume": "latest"})
    trainer = Trainer(load_config(None, resumed), progress=False)
    trainer.resume(trainer.resume_from)
    expected = 1e-5 * lr_factor(6, trainer.cfg, 12)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    trainer.step += 1  # the schedule goes on from the new base rate
    trainer._set_lr()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 * lr_factor(7, trainer.cfg, 12))
    trainer.lock.release()


# 2. a checkpoint is good only if every weight and buffer is finite ---------------------------------------------

def test_nonfinite_buffer_is_never_checkpointed(tmp_path):
    trainer = Trainer(load_config(None, tiny_overrides(tmp_path)), progress=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    name, buffer = next((n, b) for n, b in model.named_buffers() if n.endswith("running_var"))
    buffer.fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match=f"non-finite.*{name}.*no checkpoint was saved before it"):
        trainer.train()  # the first checkpoint falls due at step 6
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))


@pytest.mark.slow
def test_nan_message_names_the_checkpoint_it_keeps(tmp_path, monkeypatch):
    trainer = Trainer(load_config(None, tiny_overrides(tmp_path)), progress=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    original, calls = model.generate, {"n": 0}

    def poisoned(codes):
        calls["n"] += 1
        out = original(codes)
        return out * float("nan") if model.training and calls["n"] > 8 else out

    monkeypatch.setattr(model, "generate", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"last good checkpoint is .*step-0000006 \(step 6\)"):
        trainer.train()


# 3. resume refusals come before any work and leave config.yaml alone --------------------------------------

@pytest.mark.parametrize("field,value", [("encoder.J", "2"), ("encoder.L", "2"), ("whitening.d", "16"),
                                         ("data.image_size", "64"), ("generator.channels", "16")])
@pytest.mark.slow
def test_resume_refuses_a_changed_model_before_encoding(tmp_path, monkeypatch, field, value):
    first = tiny_overrides(tmp_path, train__max_steps=6)
    Trainer(load_config(None, first), progress=False).train()
    config_before = (tmp_path / "run" / "config.yaml").read_bytes()

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoding started before the refusal")

    monkeypatch.setattr("scatgen.training.prepare_codes", no_encoding)
    changed = dict(first, **{field: value, "run.resume": "latest"})
    with pytest.raises(ValueError, match=f"cannot resume.*{field}"):
        Trainer(load_config(None, changed), progress=False)
    assert (tmp_path / "run" / "config.yaml").read_bytes() == config_before


def test_resume_conflicts_allow_budgets_cadence_and_lr():
    old = load_config(None, {})
    trained = yaml.safe_load(yaml.safe_dump(config_to_dict(old)))
    allowed = load_config(None, {"train.lr": "1e-4", "train.max_steps": "9000", "train.max_minutes": "3",
                                 "train.eval_every": "7", "train.checkpoint_every": "9", "prior.kind": "gmm",
                                 "refine.steps": "5"})
    assert resume_conflicts(trained, allowed) == []
    refused = load_config(None, {"train.batch_size": "64", "run.seed": "3"})
    assert [c.split(":")[0] for c in resume_conflicts(trained, refused)] == ["run.seed", "train.batch_size"]


# 4. one run per folder -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_fresh_run_into_a_used_folder_is_refused_unless_overwrite(tmp_path):
    overrides = tiny_overrides(tmp_path, train__max_steps=6)
    Trainer(load_config(None, overrides), progress=False).train()
    with pytest.raises(ValueError, match="already holds a run.*--run.resume=latest.*--run.overwrite=true"):
        Trainer(load_config(None, overrides), progress=False)
    assert _checkpoints(tmp_path / "run") == ["step-0000006"]
    # With overwrite the old run's checkpoints go, so pruning and resume see only the new run's.
    again = dict(overrides, **{"run.overwrite": "true", "train.max_steps": "3", "train.checkpoint_every": "3"})
    Trainer(load_config(None, again), progress=False).train()
    assert _checkpoints(tmp_path / "run") == ["step-0000003"]


def test_a_second_concurrent_run_is_refused(tmp_path):
    overrides = tiny_overrides(tmp_path)
    first = Trainer(load_config(None, overrides), progress=False)
    with pytest.raises(RunDirectoryInUse, match="in use by another scatgen run"):
        Trainer(load_config(None, overrides), progress=False)
    first.lock.release()
    Trainer(load_config(None, overrides), progress=False).lock.release()  # free again


@pytest.mark.slow
def test_concurrent_train_scripts_one_fails_clearly(tmp_path):
    args = [CONFIG, *as_args(tiny_overrides(tmp_path))]
    # The first run stops itself once it holds the folder's lock, so the second certainly starts during it.
    first = popen_signalled("locked", signal.SIGSTOP, "train.py", *args, env=ONE_THREAD)
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), "the first run ended before it held the lock"
        second = run_script("train.py", *args, env=ONE_THREAD)
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=600)
    finally:
        first.kill()  # a no-op once it has finished
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert f"in use by another scatgen run (pid {first.pid})" in second.stderr
    assert first.returncode == 0, err[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 12


# 5. bit rot is detected: caches recompute, checkpoints fall back, bundles refuse -----------------------------

@pytest.mark.slow
def test_corrupt_code_and_whitening_cache_are_recomputed(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path))
    encoder, codesets = prepare_codes(cfg, progress=False)
    whitening = encoder.whitening
    cache = tmp_path / "cache"
    code_file = next(cache.glob("codes-train-*.safetensors"))
    whitening_file = next(cache.glob("whitening-*.safetensors"))
    _flip_bytes(code_file)
    _flip_bytes(whitening_file)
    with pytest.warns(UserWarning) as record:
        encoder2, codesets2 = prepare_codes(cfg, progress=False)
        whitening2 = encoder2.whitening
    messages = " ".join(str(w.message) for w in record)
    assert "corrupt code cache entry" in messages and "corrupt whitening cache entry" in messages
    torch.testing.assert_close(codesets2["train"].codes, codesets["train"].codes)
    assert whitening2.fingerprint() == whitening.fingerprint()
    assert torch.isfinite(codesets2["train"].codes).all()


@pytest.mark.slow
def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
    overrides = tiny_overrides(tmp_path)
    Trainer(load_config(None, overrides), progress=False).train()
    run = tmp_path / "run"
    _flip_bytes(run / "checkpoints" / "step-0000012" / "model.safetensors")
    with pytest.warns(CheckpointWarning, match="step-0000012.*model.safetensors.*corrupt"):
        trainer = Trainer(load_config(None, dict(overrides, **{"run.resume": "latest"})), progress=False)
    assert trainer.resume_from.name == "step-0000006"
    assert "corrupt-step-0000012" in _checkpoints(run)
    metrics = trainer.train()
    assert metrics["steps"] == 12


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.safetensors", "bundle.json", "whitening.safetensors", "config.yaml"])
def test_corrupt_bundle_is_an_error_naming_the_file(run_dir, tmp_path, name):
    bundle = tmp_path / "model"
    shutil.copytree(run_dir / "model", bundle)
    _flip_bytes(bundle / name, offset_from_end=8, n=4)
    with pytest.raises(CorruptFileError, match=f"corrupt bundle: .*{name}"):
        load_bundle(bundle)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate-model", "not-json", "not-yaml"])
def test_a_bundle_written_broken_is_still_a_one_line_error(run_dir, tmp_path, damage):
    bundle = tmp_path / "model"
    shutil.copytree(run_dir / "model", bundle)
    if damage == "truncate-model":
        data = (bundle / "model.safetensors").read_bytes()
        (bundle / "model.safetensors").write_bytes(data[: len(data) // 2])
        pattern = "model.safetensors' is not a readable safetensors file"
    elif damage == "not-json":
        (bundle / "bundle.json").write_text('{"format_version": 1, ')
        pattern = "bundle.json' is not valid JSON"
    else:
        (bundle / "config.yaml").write_text("data: [unclosed\n")
        pattern = "config.yaml' is not valid YAML"
    write_manifest(bundle)  # checksums of the broken files: as if the bundle had been written broken
    with pytest.raises(ValueError, match=pattern):
        load_bundle(bundle)


@pytest.mark.slow
def test_a_bundle_without_its_checksums_is_refused(run_dir, tmp_path):
    bundle = tmp_path / "model"
    shutil.copytree(run_dir / "model", bundle)
    (bundle / "checksums.json").unlink()  # the manifest is written last: without it the bundle is incomplete
    with pytest.raises(CorruptFileError, match="has no checksums.json: it was not completely written"):
        load_bundle(bundle)


@pytest.mark.slow
def test_sample_script_reports_a_corrupt_bundle_in_one_line(run_dir, tmp_path):
    bundle = tmp_path / "model"
    shutil.copytree(run_dir / "model", bundle)
    _flip_bytes(bundle / "model.safetensors")
    result = run_script("sample.py", "sample", str(bundle), "--n", "4", "--refine", "0", "--out", str(tmp_path))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "model.safetensors" in result.stderr and "corrupt" in result.stderr


# kills ------------------------------------------------------------------------------------------------------

def _train_killed_at(point, overrides):
    """train.py, killed by SIGKILL at `point` of its work (see signal_points)."""
    proc = popen_signalled(point, signal.SIGKILL, "train.py", CONFIG, *as_args(overrides), env=ONE_THREAD)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err[-2000:]}"


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_gives_the_straight_run(tmp_path):
    # No wall-clock budget: its time-based learning-rate decay would differ between any two runs.
    base = dict(train__max_steps=60, train__checkpoint_every=10, train__eval_every=30, train__max_minutes=0)
    straight = tiny_overrides(tmp_path / "a", **base)
    assert run_script("train.py", CONFIG, *as_args(straight), env=ONE_THREAD).returncode == 0
    killed = tiny_overrides(tmp_path / "b", **base)
    run = tmp_path / "b" / "run"
    _train_killed_at("checkpoint", killed)
    assert _checkpoints(run) == ["step-0000010"] and not (run / "model").exists()
    result = run_script("train.py", CONFIG, *as_args(dict(killed, **{"run.resume": "latest"})), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = load_file(str(tmp_path / "a/run/model/model.safetensors")), load_file(str(run / "model/model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_sigkill_during_encoding_then_rerun_completes_and_leaves_no_spill(tmp_path):
    overrides = tiny_overrides(tmp_path, train__max_steps=3)
    cache = tmp_path / "cache"
    _train_killed_at("spill", overrides)
    spills = list(cache.glob(".spill-*.f32"))
    assert len(spills) == 1 and spills[0].stat().st_size > 0, "the kill should leave the spill behind"
    result = run_script("train.py", CONFIG, *as_args(overrides))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "scattering spill left by a killed run" in result.stderr
    assert not list(cache.glob(".spill-*.f32"))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 3


def test_spill_in_use_is_not_removed(tmp_path):
    spill = CoeffSpill(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        remove_stale_spills(tmp_path)
    assert os.path.exists(spill.path)
    spill.close()


# one-line errors ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_unwritable_out_dir_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    overrides = tiny_overrides(tmp_path, run__out_dir=blocker / "run")
    result = run_script("train.py", CONFIG, *as_args(overrides))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "a part of the path is a regular file" in result.stderr or "Not a directory" in result.stderr


@pytest.mark.parametrize("override,message", [
    ("--train.eval_images=0", "train.eval_images=0 must be >= 1"),
    ("--train.betas=[0.9,1.5]", "train.betas"),
    ("--run.seed=-3", "run.seed=-3"),
    ("--train.lr=inf", "train.lr=inf must be a finite number"),
    ("--data.image_size=48", "48"),
])
@pytest.mark.slow
def test_bad_values_fail_before_any_work(tmp_path, tiny, override, message):
    result = run_script("train.py", CONFIG, *as_args(tiny), override)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_manifest_detects_a_missing_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"123")
    write_manifest(tmp_path)
    (tmp_path / "a.bin").unlink()
    from scatgen.integrity import verify_manifest
    with pytest.raises(CorruptFileError, match="a.bin' is missing"):
        verify_manifest(tmp_path)


@pytest.mark.slow
def test_sample_script_rejects_a_bad_dataset_index(run_dir, tmp_path):
    result = run_script("sample.py", "interpolate", str(run_dir), "--a", "test:abc", "--b", "test:1",
                        "--refine", "0", "--out", str(tmp_path))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "'test:abc': expected a whole number" in result.stderr


@pytest.mark.slow
def test_reconstruct_folder_skips_a_corrupt_file(run_dir, tmp_path):
    from PIL import Image

    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(folder / f"ok{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = run_script("sample.py", "reconstruct", str(run_dir), "--folder", str(folder), "--refine", "0",
                        "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipping unreadable image" in result.stderr and "broken.png" in result.stderr
    report = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert "broken.png" not in json.dumps(report) and "ok1.png" in json.dumps(report)
