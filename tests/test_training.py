import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ROOT, as_args, run_script, tiny_overrides
from scatgen.bundle import load_bundle
from scatgen.codes import prepare_codes
from scatgen.config import load_config
from scatgen.integrity import write_manifest
from scatgen.training import NonFiniteLossError, Trainer, lr_factor, noisy_codes


@pytest.mark.slow
def test_train_script_end_to_end(tmp_path, tiny):
    result = run_script("train.py", str(ROOT / "configs/polygons.yaml"), *as_args(tiny))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.json", "model/model.safetensors", "model/whitening.safetensors",
                 "model/config.yaml", "model/bundle.json", "images/reconstructions.png", "images/samples.png",
                 "images/interpolation.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["test/psnr"] > 5
    assert list((run / "logs").rglob("events.out.tfevents*")), "no TensorBoard events"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000006", "step-0000012"]
    # The second run hits the code cache and so skips the whitening fit and the encoding.
    cache_files = sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors"))
    assert len([f for f in cache_files if f.startswith("codes-")]) == 2


@pytest.mark.slow
def test_bad_config_fails_before_any_work(tmp_path, tiny):
    result = run_script("train.py", str(ROOT / "configs/polygons.yaml"), *as_args(tiny), "--train.lrr=1")
    assert result.returncode == 2
    assert "Did you mean 'train.lr'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def _weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path):
    straight = tiny_overrides(tmp_path, train__code_noise=0.3)
    Trainer(load_config(None, straight), progress=False).train()
    # Crash after step 6: a fresh run directory holding only that checkpoint, resumed.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step-0000006", resumed_dir / "checkpoints" / "step-0000006")
    resumed = dict(straight, **{"run.out_dir": str(resumed_dir), "run.resume": "latest"})
    trainer = Trainer(load_config(None, resumed), progress=False)
    trainer.train()
    a, b = _weights(tmp_path / "run"), _weights(resumed_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_interrupt_saves_a_checkpoint_and_resume_continues(tmp_path):
    overrides = tiny_overrides(tmp_path)
    trainer = Trainer(load_config(None, overrides), progress=False)
    trainer._request_stop(None, None)  # what Ctrl-C does
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (tmp_path / "run" / "checkpoints" / "step-0000001").is_dir()
    assert not (tmp_path / "run" / "model").exists()
    metrics = Trainer(load_config(None, dict(overrides, **{"run.resume": "latest"})), progress=False).train()
    assert metrics["steps"] == 12


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(load_config(None, tiny_overrides(tmp_path)), progress=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    original = model.generate
    calls = {"n": 0}

    def poisoned(codes):
        calls["n"] += 1
        out = original(codes)
        return out * float("nan") if model.training and calls["n"] > 8 else out

    monkeypatch.setattr(model, "generate", poisoned)
    with pytest.raises(NonFiniteLossError, match="loss became nan.*last good checkpoint"):
        trainer.train()
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-0000006"]
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.slow
def test_bundle_roundtrip_and_mismatch_refused(tmp_path):
    trainer = Trainer(load_config(None, tiny_overrides(tmp_path, train__max_steps=2)), progress=False)
    trainer.train()
    generator, whitening, cfg = load_bundle(tmp_path / "run")
    codes = torch.randn(3, whitening.d)
    original = trainer.accelerator.unwrap_model(trainer.model).eval()
    torch.testing.assert_close(generator(codes)[0], original(codes)[0])
    info_path = tmp_path / "run" / "model" / "bundle.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps(dict(info, image_size=64)))
    with pytest.raises(ValueError, match="corrupt bundle.*bundle.json"):  # the checksum notices first
        load_bundle(tmp_path / "run")
    write_manifest(tmp_path / "run" / "model")  # a consistent but contradictory bundle
    with pytest.raises(ValueError, match="image_size"):
        load_bundle(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no model bundle"):
        load_bundle(tmp_path / "nowhere")


def test_lr_schedule_and_code_noise():
    cfg = load_config(None, {"train.warmup_steps": "10", "train.schedule": "cosine"})
    assert lr_factor(0, cfg, 100) == pytest.approx(0.1)
    assert lr_factor(10, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(100, cfg, 100) == pytest.approx(0.0, abs=1e-9)
    # With a wall-clock budget the decay follows whichever of steps and minutes is further along.
    timed = load_config(None, {"train.warmup_steps": "10", "train.schedule": "cosine", "train.max_minutes": "2"})
    assert lr_factor(10, timed, 1000, train_seconds=60) == pytest.approx(0.5)
    assert lr_factor(10, timed, 1000, train_seconds=120) == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(505, timed, 1000, train_seconds=1) == pytest.approx(0.5)
    assert lr_factor(10, cfg, 1000, train_seconds=1e6) == pytest.approx(1.0)  # no budget: time is ignored
    codes = torch.randn(20000, 4) * torch.tensor([1.0, 0.5, 0.1, 1.0])
    variances = codes.var(0)
    noisy = noisy_codes(codes, variances, level=0.0, seed=1)
    # Each component ends with unit variance; the low-variance ones got the most noise.
    torch.testing.assert_close(noisy.var(0), torch.ones(4), atol=0.05, rtol=0)
    noise_std = (noisy - codes).std(0)
    torch.testing.assert_close(noise_std, (1 - variances).clamp_min(0).sqrt(), atol=0.02, rtol=0)
    assert noise_std[2] > noise_std[1] > noise_std[0]
    # With ν > 0 the codes shrink by sqrt(1 − ν) and unit variance is kept.
    mixed = noisy_codes(codes, variances, level=0.5, seed=2)
    torch.testing.assert_close(mixed.var(0), torch.ones(4), atol=0.05, rtol=0)


@pytest.mark.slow
def test_two_processes_train_together_and_write_exactly_one_bundle(tmp_path):
    overrides = tiny_overrides(tmp_path)
    with socket.socket() as probe:  # a free port: a fixed one collides with any other run on the machine
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "train.py", str(ROOT / "configs/polygons.yaml"), *as_args(overrides)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    # One job of two ranks, not two independent single-process runs.
    assert json.loads((tmp_path / "run/metrics.json").read_text())["num_processes"] == 2
    assert result.stdout.count("test PSNR") == 1
    checkpoints = sorted((tmp_path / "run/checkpoints").glob("step-*"))
    assert {p.name for p in checkpoints[-1].glob("random_states_*")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert not list((tmp_path / "run/checkpoints").glob(".tmp-*"))
    bundles = list((tmp_path / "run").rglob("bundle.json"))
    assert len(bundles) == 1
    generator, whitening, cfg = load_bundle(bundles[0].parent)
    assert whitening.d == 32
    # Statistics summed over the ranks' shards give the single-process whitening.
    single = load_config(ROOT / "configs/polygons.yaml", {**overrides, "run.cache_dir": str(tmp_path / "cache1")})
    reference = prepare_codes(single, "cpu", progress=False)[0].whitening
    torch.testing.assert_close(whitening.mean, reference.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(whitening.eigenvalues, reference.eigenvalues, rtol=1e-3, atol=1e-6)


def _presplit_folder(root, n_train: int = 64, n_test: int = 16):
    """A torchvision-style tree, root/train/ and root/test/, of 32² smooth random images."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("test", n_test)):
        (root / split).mkdir(parents=True)
        images = torch.nn.functional.avg_pool2d(torch.rand(n, 3, 32, 32, generator=g), 5, 1, 2)
        for i, image in enumerate(images):
            pixels = (image.permute(1, 2, 0) * 255).round().byte().numpy()
            Image.fromarray(pixels).save(root / split / f"{i:03d}.png")


@pytest.mark.slow
def test_train_script_on_a_presplit_folder(tmp_path):
    root = tmp_path / "images"
    _presplit_folder(root)
    overrides = tiny_overrides(tmp_path, data__name="folder", data__root=root, data__num_train=0, data__num_test=0,
                               train__max_steps=4, prior__kind="normal", refine__steps=0)
    result = run_script("train.py", str(ROOT / "configs/polygons.yaml"), *as_args(overrides))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is split already: train/ is the train split, test/ the test split" in result.stderr
    # The codes of each split come from its own folder, all of it and nothing else.
    for split, n in (("train", 64), ("test", 16)):
        (cache,) = (tmp_path / "cache").glob(f"codes-{split}-*.safetensors")
        with safe_open(str(cache), framework="pt") as f:
            identity = json.loads(f.metadata()["scatgen_codes"])["dataset"]
            assert len(f.get_tensor("codes")) == n
        assert identity["split_mode"] == "folders" and identity["split_folder"] == split and identity["count"] == n
    assert load_bundle(tmp_path / "run")[2].data.split == "auto"


def test_step_rate_flags_a_collapse_once_and_ignores_excluded_time(monkeypatch):
    from scatgen.speed import StepRate

    clock = {"t": 0.0}
    monkeypatch.setattr("scatgen.speed.time.time", lambda: clock["t"])
    rate = StepRate(0)
    step = 0
    for seconds in (5.0, 1.0, 1.1):  # warm-up window, then 20 steps/s
        step += 20
        clock["t"] += seconds
        rate.rate(step)
        assert not rate.collapsed()
    clock["t"] += 30.0  # an evaluation pause, excluded
    rate.exclude(30.0)
    step += 20
    clock["t"] += 1.0
    assert rate.rate(step) == pytest.approx(20.0) and not rate.collapsed()
    step += 20
    clock["t"] += 2.5  # 8 steps/s: slower, but within 3× of the best
    rate.rate(step)
    assert not rate.collapsed()
    step += 20
    clock["t"] += 10.0  # 2 steps/s: a collapse, flagged once
    rate.rate(step)
    assert rate.collapsed() and not rate.collapsed()


@pytest.mark.slow
def test_compiled_generator_matches_eager():
    from scatgen.generators import build_generator, generator_config_class

    cfg = generator_config_class("gsn")()
    cfg.channels, cfg.min_channels = 16, 8
    torch.manual_seed(0)
    eager = build_generator(cfg, code_dim=16, image_size=8, J=1, L=4)
    compiled = build_generator(cfg, code_dim=16, image_size=8, J=1, L=4)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys
    codes, targets = torch.randn(4, 16), torch.rand(4, 3, 8, 8) * 2 - 1
    (a, loss_a), (b, loss_b) = eager(codes, targets, loss="l1"), compiled(codes, targets, loss="l1")
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    loss_a.backward()
    loss_b.backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bf16 faster", "bf16 slower", "no clock"])
def test_cpu_training_times_bf16_and_keeps_the_faster_only_on_the_clock(tmp_path, monkeypatch, case):
    from scatgen.speed import StepPrecision

    def fake_step_done(self, bf16, started):  # timings made up, so the choice is the test's
        self.timed(bf16, (0.01 if case == "bf16 faster" else 0.10) if bf16 else 0.05)

    monkeypatch.setattr(StepPrecision, "step_done", fake_step_done)
    steps = 2 * StepPrecision.PROBE + 6
    minutes = 0 if case == "no clock" else 30  # 30 minutes: the clock bounds the run but does not end it
    overrides = tiny_overrides(tmp_path, train__max_steps=steps, train__max_minutes=minutes, train__eval_every=1000,
                               train__checkpoint_every=1000, prior__kind="normal")
    trainer = Trainer(load_config(None, overrides), progress=False)
    generator = trainer.accelerator.unwrap_model(trainer.model)
    first = next(m for m in generator.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    seen = []  # the dtype each training step computed in (evaluation runs in eval mode)
    first.register_forward_hook(lambda m, i, out: seen.append(out.dtype) if m.training else None)
    metrics = trainer.train()
    assert len(seen) == steps
    if case == "no clock":  # float32 throughout, so that a run bound by steps repeats to the bit
        assert set(seen) == {torch.float32} and metrics["train_precision"] == "float32"
        return
    probe = [torch.bfloat16 if i % 2 else torch.float32 for i in range(2 * StepPrecision.PROBE)]
    assert seen[:len(probe)] == probe  # alternating, float32 first
    kept = torch.bfloat16 if case == "bf16 faster" else torch.float32
    assert set(seen[len(probe):]) == {kept}
    assert metrics["train_precision"] == ("bf16 (bf16 steps timed 5.00x faster)" if case == "bf16 faster"
                                          else "float32 (bf16 steps timed 0.50x faster)")
    for p in generator.parameters():
        assert p.dtype == torch.float32  # autocast computes in bf16; the weights stay float32


def test_run_budget_gives_way_in_the_prior():
    from scatgen.finish import prior_minutes

    cfg = load_config(None, {"run.max_minutes": "12", "train.max_minutes": "5", "prior.max_minutes": "4"})
    assert prior_minutes(cfg, seconds_left=600, reserve=60) == (4, "")  # on time: its own budget
    minutes, note = prior_minutes(cfg, seconds_left=240, reserve=60)  # behind: what is left
    assert minutes == pytest.approx(3.0) and "4.0 minutes left, 1.0 of them kept for the pictures" in note
    minutes, note = prior_minutes(cfg, seconds_left=200, reserve=80)
    assert minutes == pytest.approx(2.0) and "late" not in note
    minutes, note = prior_minutes(cfg, seconds_left=30, reserve=60)  # far behind: a floor, and a warning
    assert minutes == pytest.approx(1.0) and "about 1.5 minutes late" in note
    steps_only = load_config(None, {"run.max_minutes": "12", "prior.max_minutes": "0"})
    assert prior_minutes(steps_only, seconds_left=300, reserve=60)[0] == pytest.approx(4.0)


def test_run_budget_must_leave_time_after_g():
    with pytest.raises(ValueError, match=r"run.max_minutes=5.0 must exceed train.max_minutes=6.0"):
        load_config(None, {"run.max_minutes": "5", "train.max_minutes": "6"})
    with pytest.raises(ValueError, match=r"run.max_minutes=-1.0 must be a finite number >= 0"):
        load_config(None, {"run.max_minutes": "-1"})


@pytest.mark.slow
def test_a_run_past_its_budget_shortens_the_prior_and_says_so(tmp_path, capsys):
    overrides = tiny_overrides(tmp_path, run__max_minutes=1e-4, train__max_minutes=0, prior__max_minutes=2)
    metrics = Trainer(load_config(None, overrides), progress=False).train()
    assert metrics["prior_budget_minutes"] == pytest.approx(0.5)  # the floor: a quarter of its 2 minutes
    assert metrics["pictures_estimate_seconds"] > 0
    assert "the prior gets 0.5 of its 2" in capsys.readouterr().out
    assert load_bundle(tmp_path / "run" / "model")[2].prior.max_minutes == 2  # the bundle keeps the config


def _governed_rates(phases, **kw):
    """Drive a ThreadGovernor through phases of (units, {threads: units per second}) on a fake clock;
    → the thread count at the end of each phase, and the mean rate over each phase."""
    from scatgen.speed import ThreadGovernor

    now = [0.0]
    governor = ThreadGovernor(clock=lambda: now[0], set_threads=lambda n: None, threads=2, **kw)
    ends, means = [], []
    for units, rates in phases:
        start = now[0]
        for _ in range(units):
            now[0] += 1 / rates[governor.threads]
            governor.tick()
        ends.append(governor.threads)
        means.append(units / (now[0] - start))
    return ends, means


def test_thread_governor_drops_to_one_thread_beside_a_neighbour_and_comes_back():
    alone, beside = {2: 30.0, 1: 22.0}, {2: 6.0, 1: 20.0}  # the shape of benchmarks/contention.py's rates
    ends, means = _governed_rates([(900, alone), (600, beside), (900, alone)])
    assert ends == [2, 1, 2]
    assert means[0] > 0.95 * 30  # alone it costs little: one probe window in ten at the slower count
    assert means[1] > 0.8 * 20  # beside a neighbour it is near the 1-thread rate, far above 6
    assert means[2] > 0.9 * 30


def test_thread_governor_keeps_one_thread_count_where_they_tie_and_is_off_by_default(monkeypatch):
    ends, _ = _governed_rates([(600, {2: 20.0, 1: 20.0})])
    assert ends == [2]  # a tie never beats the gain: no switching back and forth
    import scatgen.speed as speed

    calls = []
    monkeypatch.setattr(speed.torch, "set_num_threads", lambda n: calls.append(n))
    monkeypatch.setattr(speed, "_governor", None)
    for _ in range(1000):
        speed.work_done()  # the library alone never changes the thread count
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert speed.govern_threads() is None and calls == []  # nor does an entry point under the user's choice


def test_thread_governor_takes_a_paused_loop_for_a_pause_not_a_neighbour():
    from scatgen.speed import ThreadGovernor

    now = [0.0]
    governor = ThreadGovernor(clock=lambda: now[0], set_threads=lambda n: None, threads=2, probe_every=1000)
    for i in range(400):
        now[0] += 1 / 30 + (20.0 if i % 50 == 49 else 0.0)  # 30 units/s, and a 20-second pause now and then
        governor.tick()
    assert governor.threads == 2 and governor.switches == 2  # the one initial probe of 1 thread, and back


def test_only_runs_that_stop_by_the_clock_let_the_governor_change_threads():
    from scatgen.cli import has_time_budget

    assert has_time_budget(load_config(ROOT / "configs/polygons.yaml"))
    fixed = {"train.max_minutes": "0", "prior.max_minutes": "0", "run.max_minutes": "0"}
    assert not has_time_budget(load_config(ROOT / "configs/polygons.yaml", fixed))  # repeatable to the bit
    assert has_time_budget(load_config(None, {"train.max_minutes": "1"}))
