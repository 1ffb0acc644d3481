"""codes → generator: regression training on accelerate, with checkpoints, resume and logging.

`Trainer` prepares the run (the run folder, the data, the encoder and its codes, the generator),
trains to the budget and hands the end of the run to `scatgen.finish`. Run directory:
    config.yaml             the resolved config
    checkpoints/step-N/     accelerate state, for --run.resume
    logs/                   TensorBoard
    model/                  the bundle, for sample.py and scatgen.load
    images/                 reconstructions.png, samples.png, interpolation.png, variations.png
    metrics.json            final test PSNR and run figures
"""

from __future__ import annotations

import math
import os
import signal
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader

from scatgen.checkpoints import (RunLock, RunPaths, check_run_directory, checkpoint_step, load_checkpoint,
                                 nonfinite_tensors, save_checkpoint, set_aside_later)
from scatgen.codes import prepare_codes
from scatgen.config import Config, save_config
from scatgen.data import build_dataset, cache_images, collate_skip_none
from scatgen.data.batches import CodedImages, StepBatches, first_readable
from scatgen.finish import finish_run
from scatgen.generators import Generator, build_generator
from scatgen.metrics import finite_mean, psnr
from scatgen.pictures import grid, rows_grid, to_unit
from scatgen.prior import NormalPrior
from scatgen.speed import (StepPrecision, StepRate, budget_steps, describe_precision, usable_cores, warn_slowdown,
                           work_done)
from scatgen.utils import atomic_path, progress_bar


class NonFiniteLossError(RuntimeError):
    pass


class TrainingStopped(KeyboardInterrupt):
    """A stop signal (SIGINT from Ctrl-C, SIGTERM from docker stop, timeout, SLURM, Kubernetes);
    `signum` says which, so that the command can exit with 128 + signum."""

    def __init__(self, signum: int = signal.SIGINT, checkpointed: bool = False) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.checkpointed = int(signum), checkpointed


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def lr_factor(step: int, cfg: Config, total: int, train_seconds: float = 0.0) -> float:
    """Warmup, then decay over whichever budget binds first: `total` steps or `max_minutes`,
    so that a run cut by the clock still ends at a low learning rate."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, total - t.warmup_steps)
    if t.max_minutes > 0:
        progress = max(progress, train_seconds / (60 * t.max_minutes))
    if t.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if t.schedule == "linear":
        return max(0.0, 1 - progress)
    return 1.0


def noisy_codes(codes: torch.Tensor, variances: torch.Tensor, level: float, seed: int) -> torch.Tensor:
    """sqrt(1−ν) z + ε with ε ~ N(0, 1 − (1−ν) v): each component keeps unit variance,
    and components with low train variance v get more noise."""
    noise_var = (1 - (1 - level) * variances).clamp_min(0)
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(codes.shape, generator=generator).to(codes.device)
    return math.sqrt(1 - level) * codes + eps * noise_var.sqrt().to(codes.device)


@torch.no_grad()
def reconstruction_psnr(generator: Generator, codes: torch.Tensor, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean per-image PSNR (dB, images in [0, 1]), infinite values excluded from the mean."""
    was_training = generator.training
    generator.eval()
    values = []
    for c, x in zip(codes.split(batch_size), images.split(batch_size)):
        recons = generator(c.to(next(generator.parameters()).device))[0].float().cpu()
        values.append(psnr(to_unit(recons), to_unit(x)))
    generator.train(was_training)
    values = torch.cat(values)
    return finite_mean(values)


class Trainer:
    """One trainer for every generator kind; runs unchanged on CPU, one GPU or many (accelerate)."""

    def __init__(self, cfg: Config, progress: bool = True) -> None:
        self.started = time.time()  # run.max_minutes counts from here
        self.cfg = cfg
        t = cfg.train
        mp = t.mixed_precision
        # auto on a GPU: bf16, through accelerate. auto on a CPU: bf16 only where it times faster
        # (StepPrecision), in a single-process run that stops by the clock; float32 elsewhere.
        cpu_auto = mp == "auto" and not torch.cuda.is_available()
        if mp == "auto":
            mp = "no" if cpu_auto else "bf16"
        self.paths = RunPaths(Path(cfg.run.out_dir))
        # accelerate only sets up a multi-process CPU run (gloo) when told cpu=True; without it
        # each process of `torchrun`/`accelerate launch` would silently train alone.
        multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        self.accelerator = Accelerator(
            cpu=multi_cpu, mixed_precision=mp, log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.paths.root), logging_dir=str(self.paths.logs)),
        )
        timed = cpu_auto and t.max_minutes > 0 and self.accelerator.num_processes == 1
        self.precision = StepPrecision("auto", timed, self.accelerator.device.type, "train.mixed_precision")
        self.progress = progress and self.accelerator.is_main_process
        set_seed(cfg.run.seed)
        # Everything that can refuse the run does so here, before any encoding, and before
        # config.yaml is written, so a refused command changes nothing on disk.
        self.lock = RunLock(self.paths.root)
        self._all_ranks_or_raise(self.lock.acquire if self.accelerator.is_main_process else None)
        try:
            self._setup()
        except BaseException:
            self.lock.release()  # a refused run must not keep the folder locked for the next attempt
            raise

    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        # The main process checks first (it may move a corrupt checkpoint aside), then the others.
        found: dict[str, Path | None] = {}

        def check() -> None:
            found["resume_from"] = check_run_directory(cfg, self.paths, clear=self.accelerator.is_main_process)

        main = self.accelerator.is_main_process
        self._all_ranks_or_raise(check if main else None)
        self._all_ranks_or_raise(None if main else check)
        self.resume_from = found["resume_from"]
        self.train_images = build_dataset(cfg.data, "train")
        self.test_images = build_dataset(cfg.data, "test")
        for split, dataset in (("train", self.train_images), ("test", self.test_images)):
            if len(dataset) == 0:
                raise ValueError(f"the {split} split of {cfg.data.name} at '{cfg.data.root}' is empty; "
                                 f"check data.root and data.num_{split}")
        self._check_split_sizes(len(self.train_images), len(self.test_images))
        if self.accelerator.is_main_process:
            with atomic_path(self.paths.root / "config.yaml") as tmp:
                save_config(cfg, tmp)

        self.encoder, self.codesets = prepare_codes(cfg, self.accelerator.device, self.progress)
        if cfg.data.cache_images:  # encoding built the image cache; from here on images come from it
            self.train_images, self.test_images = (cache_images(d, cfg.run.cache_dir, t.num_workers, self.progress)
                                                   for d in (self.train_images, self.test_images))
        train_codes = self.codesets["train"].codes
        self.code_variances = train_codes.var(0)
        n_train = len(train_codes)
        world = self.accelerator.num_processes
        steps_per_epoch = n_train // (t.batch_size * world)
        self.total_steps = t.max_steps if t.max_steps > 0 else t.epochs * max(steps_per_epoch, 1)

        set_seed(cfg.run.seed)  # initialisation must not depend on whether the code cache was hit
        generator = build_generator(cfg.generator, code_dim=self.encoder.d, image_size=cfg.data.image_size,
                                    J=cfg.encoder.J, L=cfg.encoder.L)
        if t.compile:
            generator.compile()  # in place: state_dict keys, checkpoints and bundles stay as in eager mode
        optimizer = torch.optim.AdamW(generator.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.train_seconds = 0.0  # wall-clock time in training steps, evaluation excluded
        self.model, self.optimizer = self.accelerator.prepare(generator, optimizer)
        self.step = 0
        self.history: list[dict[str, float]] = []  # test PSNR against step and train_seconds
        self.last_checkpoint: Path | None = None  # newest checkpoint known intact and finite
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=self.accelerator.device)
        self._first_bad_loss = torch.zeros((), device=self.accelerator.device)
        self._stop_requested = False
        self._stop_signal = signal.SIGINT

    def _check_split_sizes(self, n_train: int, n_test: int) -> None:
        """Refuse, before any encoding, splits too small for the run; warn about a code size the
        train images cannot support."""
        cfg, t = self.cfg, self.cfg.train
        where = f"data.root '{cfg.data.root}'" if cfg.data.root else f"data.name={cfg.data.name}"
        if n_test < 2:
            raise ValueError(f"the test split of {where} holds {n_test} image; training needs at least 2 (the "
                             f"pictures and the test PSNR compare test images): add test images, or raise "
                             f"data.test_fraction / data.num_test")
        world = self.accelerator.num_processes
        if n_train < t.batch_size * world:
            raise ValueError(f"train.batch_size={t.batch_size} × {world} process(es) exceeds the {n_train} train "
                             f"images of {where}; lower train.batch_size or add images")
        fitted = min(n_train, cfg.whitening.max_images) if cfg.whitening.max_images > 0 else n_train
        if cfg.whitening.d > fitted - 1:
            warnings.warn(
                f"whitening.d={cfg.whitening.d}, but {fitted} train images span at most {fitted - 1} directions: "
                f"{cfg.whitening.d - fitted + 1} code components will be degenerate (near-zero variance on train "
                f"codes, yet N(0, I) samples them at full scale). Lower whitening.d to at most {fitted - 1}, or "
                f"train on more images", stacklevel=2)

    def _all_ranks_or_raise(self, action) -> None:
        """Run `action` (on the ranks that have one); if it fails on any rank, every rank raises,
        so no rank is left waiting in a collective."""
        error = None
        try:
            if action is not None:
                action()
        except (RuntimeError, ValueError, OSError) as e:
            error = e
        if self._any_rank(error is not None):
            raise error if error is not None else RuntimeError("another process of this run failed to start")

    # -- checkpoints -------------------------------------------------------------------------------

    def _no_good_checkpoint_note(self) -> str:
        if self.last_checkpoint is not None:
            return (f"the last good checkpoint is {self.last_checkpoint} (step {checkpoint_step(self.last_checkpoint)}); "
                    f"lower train.lr (now {self.cfg.train.lr}) or enable train.grad_clip, then resume with "
                    f"--run.resume=latest")
        return (f"no checkpoint was saved before it; lower train.lr (now {self.cfg.train.lr}) or enable "
                f"train.grad_clip and start the run again")

    def _note_nonfinite(self, loss: torch.Tensor) -> None:
        """Remember, on the device, the first step whose loss was not finite, and that loss."""
        first = self._first_bad_step < 0
        bad = ~torch.isfinite(loss.detach()) & first
        self._first_bad_step = torch.where(bad, torch.full_like(self._first_bad_step, self.step), self._first_bad_step)
        self._first_bad_loss = torch.where(bad, loss.detach().float(), self._first_bad_loss)

    def _raise_if_nonfinite(self) -> None:
        step = int(self._first_bad_step)  # the one host sync, every log_every steps
        if self._any_rank(step >= 0):
            value = float(self._first_bad_loss) if step >= 0 else float("nan")
            raise NonFiniteLossError(f"the loss became {value} at step {max(step, 0)}; "
                                     f"{self._no_good_checkpoint_note()}")

    def save_checkpoint(self) -> Path:
        """accelerate state for step `self.step` plus the config and a checksum manifest, written to a
        temporary folder and renamed into place; refused after a non-finite loss, or if any weight or
        buffer is not finite."""
        self._raise_if_nonfinite()
        bad = nonfinite_tensors(self.accelerator.unwrap_model(self.model))
        if self._any_rank(bool(bad)):
            raise NonFiniteLossError(
                f"the model became non-finite by step {self.step} ({', '.join(bad[:3]) or 'on another process'}"
                f"{', …' if len(bad) > 3 else ''}), so no checkpoint was written; {self._no_good_checkpoint_note()}")
        self.last_checkpoint = save_checkpoint(self.accelerator, self.paths, self.cfg, {
            "step": self.step, "total_steps": self.total_steps, "train_seconds": self.train_seconds,
            "history": self.history})
        return self.last_checkpoint

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint chosen (and verified) by check_run_directory. The learning
        rate follows train.lr and the step (it is set every step); the weight decay is the config's,
        which a resume may change."""
        state = load_checkpoint(self.accelerator, path)
        self.step, self.train_seconds, self.history = state["step"], state["train_seconds"], state["history"]
        for group in self.optimizer.param_groups:
            group["weight_decay"] = self.cfg.train.weight_decay
        self._set_lr()
        if self.accelerator.is_main_process:
            for name in set_aside_later(self.paths, self.step):
                self.accelerator.print(f"notice: {name} is newer than the resumed step; moved to superseded-{name}")
        self.last_checkpoint = path
        self.accelerator.print(f"resumed from {path} at step {self.step} (lr {self.cfg.train.lr:g})")

    def _set_lr(self) -> None:
        lr = self.cfg.train.lr * lr_factor(self.step, self.cfg, self.total_steps, self.train_seconds)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step_precision(self) -> str:
        """What the training steps ran in: accelerate's mixed precision where it set one, else
        StepPrecision's choice ("float32", "bf16 (bf16 steps timed 1.25x faster)", …)."""
        accelerate_mp = str(self.accelerator.mixed_precision)
        return accelerate_mp if accelerate_mp != "no" else describe_precision(self.precision)

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Test PSNR of G alone and image grids for TensorBoard; main process only."""
        t = self.cfg.train
        generator = self.accelerator.unwrap_model(self.model)
        codes, images = first_readable(self.codesets["test"], self.test_images, t.eval_images)
        metrics = {"test/psnr": reconstruction_psnr(generator, codes, images)}
        self.history.append({"step": self.step, "train_seconds": self.train_seconds, "test_psnr": metrics["test/psnr"]})
        noise = NormalPrior(self.encoder.d).sample(t.grid_size, seed=self.cfg.run.seed)
        generator.eval()
        with torch.no_grad():
            recons, samples = (generator(c.to(self.accelerator.device))[0].float().cpu()
                               for c in (codes[:t.grid_size], noise))
        generator.train()
        tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
        tracker.add_image("test/reconstructions", rows_grid([images[:t.grid_size], recons]), self.step)
        tracker.add_image("samples/fixed_noise", grid(samples), self.step)
        self.accelerator.log(metrics, step=self.step)
        return metrics

    # -- the loop ----------------------------------------------------------------------------------

    def _request_stop(self, signum, frame) -> None:
        # Only a flag: the loop finishes its step, saves a checkpoint and stops on every rank together.
        self._stop_requested = True
        self._stop_signal = signum or signal.SIGINT

    def _any_rank(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor(float(flag), device=self.accelerator.device), "sum") > 0)

    def _should_stop(self) -> bool:
        """Ctrl-C on any rank, or the wall-clock budget spent. One collective per step: every
        rank also adopts the largest elapsed time, so the time-based learning rate (and the
        step at which the budget ends the run) is the same on all ranks."""
        stop, seconds = self._stop_requested, self.train_seconds
        if self.accelerator.num_processes > 1:
            flags = torch.tensor([float(stop), seconds], dtype=torch.float64, device=self.accelerator.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            stop, seconds = bool(flags[0] > 0), float(flags[1])
            self.train_seconds = seconds
        max_minutes = self.cfg.train.max_minutes
        return stop or (max_minutes > 0 and seconds > 60 * max_minutes)

    def train(self) -> dict[str, float]:
        """Train to the budget, then write the bundle, pictures and metrics.json; the run folder's
        lock is released however this ends."""
        try:
            return self._train()
        finally:
            self.lock.release()

    def _train(self) -> dict[str, float]:
        cfg, t, acc = self.cfg, self.cfg.train, self.accelerator
        if self.resume_from is not None:
            self.resume(self.resume_from)
        acc.init_trackers("tensorboard")
        if acc.device.type == "cpu":
            acc.print(f"torch threads: {torch.get_num_threads()}, usable cores: {usable_cores()}")
        dataset = CodedImages(self.train_images, self.codesets["train"])
        sampler = StepBatches(len(dataset), t.batch_size, cfg.run.seed, self.step, self.total_steps,
                              acc.process_index, acc.num_processes)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=t.num_workers, collate_fn=collate_skip_none,
                            persistent_workers=False)
        previous_handlers = {sig: signal.signal(sig, self._request_stop) for sig in STOP_SIGNALS}
        bar = progress_bar(total=self.total_steps, initial=self.step, disable=not self.progress, desc="training",
                           unit="step", dynamic_ncols=True)
        start, paused, resumed_seconds, first_step = time.time(), 0.0, self.train_seconds, self.step
        # A resumed run's budget counts the training minutes of its earlier invocations as spent.
        deadline = self.started + 60 * cfg.run.max_minutes - resumed_seconds if cfg.run.max_minutes > 0 else None
        window = StepRate(self.step)
        metrics: dict[str, float] = {}
        self.model.train()
        try:
            for batch in loader:
                # 1. evaluate and checkpoint if due (their time is not training time)
                pause = time.time()
                if self.step % t.eval_every == 0 and self.step > 0 and acc.is_main_process:
                    metrics = self.evaluate()
                if self.step % t.checkpoint_every == 0 and self.step > 0:
                    self.save_checkpoint()
                pause = time.time() - pause
                paused += pause
                window.exclude(pause)
                # Every image of this batch became unreadable since encoding: skip the step, on
                # all ranks together so that their collectives stay in step.
                if self._any_rank(batch is None):
                    self.step += 1
                    continue
                codes, images = batch
                codes, images = codes.to(acc.device, non_blocking=True), images.to(acc.device, non_blocking=True)
                if t.code_noise > 0:
                    seed = (cfg.run.seed * 1_000_003 + self.step) * 1009 + acc.process_index
                    codes = noisy_codes(codes, self.code_variances, t.code_noise, seed)
                # 2. forward and backward
                bf16, step_started = self.precision.next(), time.perf_counter()
                with acc.autocast(), self.precision.autocast(bf16):
                    _, loss = self.model(codes, images, loss=t.loss)
                self._note_nonfinite(loss)  # read back only when logging or checkpointing: no sync per step
                acc.backward(loss)
                if t.grad_clip > 0:
                    acc.clip_grad_norm_(self.model.parameters(), t.grad_clip)
                # 3. optimizer step, at this step's learning rate
                self._set_lr()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                hook = getattr(acc.unwrap_model(self.model), "after_optimizer_step", None)
                if hook is not None:
                    hook()
                self.precision.step_done(bf16, step_started)
                self.step += 1
                work_done()
                self.train_seconds = resumed_seconds + time.time() - start - paused
                # 4. log
                if self.step % t.log_every == 0:
                    self._raise_if_nonfinite()
                    steps_per_s = window.rate(self.step)
                    logs = {"train/loss": loss.item(), "train/lr": self.optimizer.param_groups[0]["lr"],
                            "train/images_per_s": steps_per_s * t.batch_size * acc.num_processes}
                    logs.update({f"train/{k}": v for k, v in acc.unwrap_model(self.model).stats.items()})
                    acc.log(logs, step=self.step)
                    if self.progress and window.collapsed():
                        warn_slowdown(window)
                    if t.max_minutes > 0:  # the bar's total follows whichever budget ends the run first
                        bar.total = budget_steps(self.step, first_step, self.total_steps, self.train_seconds,
                                                 resumed_seconds, t.max_minutes)
                        bar.set_postfix(loss=f"{logs['train/loss']:.4f}",
                                        min=f"{self.train_seconds / 60:.1f}/{t.max_minutes:g}", refresh=False)
                    else:
                        bar.set_postfix(loss=f"{logs['train/loss']:.4f}", refresh=False)
                bar.update(1)
                # 5. stop?
                if self._should_stop():
                    break
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            if t.max_minutes > 0 and not self._stop_requested:
                bar.total = bar.n  # the budget ended the run: show it complete, not past an estimate
            bar.close()
        self._raise_if_nonfinite()
        self.save_checkpoint()
        if self._stop_requested:
            name = signal.Signals(self._stop_signal).name
            acc.print(f"interrupted by {name} at step {self.step}; checkpoint saved ({self.last_checkpoint}). "
                      f"Resume with --run.resume=latest")
            acc.end_training()
            raise TrainingStopped(self._stop_signal, checkpointed=True)
        if acc.is_main_process:
            metrics = self.evaluate()
            metrics.update(steps=self.step, num_processes=acc.num_processes, minutes=(time.time() - start) / 60,
                           train_minutes=self.train_seconds / 60, history=self.history,
                           train_precision=self.step_precision())
            codes, images = first_readable(self.codesets["test"], self.test_images, 32)
            metrics = finish_run(cfg, self.paths, acc.unwrap_model(self.model), self.encoder,
                                 self.codesets["train"].codes, codes, images, metrics, self.progress, deadline)
        acc.wait_for_everyone()
        acc.end_training()
        return metrics
