"""The run directory: one run per folder (a lock), checkpoints that are checked before use, and the
rule for which config fields a resumed run may change.

A checkpoint is written into a temporary folder, given a manifest of checksums
(scatgen.integrity) and renamed into place, so `step-N/` exists only when complete;
a checkpoint whose bytes later differ from its manifest is moved aside and the previous
one is used. A checkpoint keeps the config it was trained with, and resuming compares
against it before any work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator

from scatgen.config import Config, config_to_dict, flatten_keys, read_yaml, save_config
from scatgen.integrity import CorruptFileError, verify_manifest, write_manifest
from scatgen.utils import lock_file

TRAINER_STATE = "trainer_state.json"  # step, train_seconds and the test-PSNR history

# What a resumed run may change: step budgets, cadences, the optimiser's step size, and the
# stages after training. Everything else changes the model, its data or its codes.
RESUMABLE = (
    "train.lr", "train.weight_decay", "train.grad_clip", "train.max_steps", "train.epochs", "train.max_minutes",
    "train.eval_every", "train.eval_images", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.grid_size", "train.num_workers", "train.mixed_precision", "train.compile", "encoder.compile",
    "encoder.batch_size", "data.cache_images",
    "run.out_dir", "run.cache_dir", "run.resume", "run.overwrite", "run.max_minutes",
)
RESUMABLE_SECTIONS = ("prior", "refine")


class CheckpointWarning(UserWarning):
    pass


class RunDirectoryInUse(RuntimeError):
    pass


@dataclasses.dataclass
class RunPaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def checkpoint_list(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        found = [p for p in self.checkpoints.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
        return sorted(found, key=checkpoint_step)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoint_list()
        return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


class RunLock:
    """An exclusive advisory lock on out_dir/.lock, held while a run works in the folder.

    The kernel releases it when the process dies, even by SIGKILL, so a killed run never
    leaves a folder locked."""

    def __init__(self, root: Path) -> None:
        self.path = root / ".lock"
        self.file = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        # Where the platform has no flock (Windows) this always succeeds: runs are not protected there.
        if not lock_file(self.file.fileno(), wait=False):
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise RunDirectoryInUse(
                f"run.out_dir '{self.path.parent}' is in use by another scatgen run ({holder}); wait for it to "
                f"finish or choose another --run.out_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing drops the flock
            self.file = None


def resume_conflicts(trained: dict, cfg: Config) -> list[str]:
    """The fields (as 'key: checkpoint value → new value') that a resume may not change."""
    old, new = flatten_keys(trained), flatten_keys(config_to_dict(cfg))
    conflicts = []
    # A changed kind first: it explains why that section's other fields appear or vanish.
    for key in sorted(set(old) | set(new), key=lambda k: (not k.endswith(".kind"), k)):
        if key in RESUMABLE or key.split(".")[0] in RESUMABLE_SECTIONS:
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            conflicts.append(f"{key}: {old.get(key, '<absent>')!r} → {new.get(key, '<absent>')!r}")
    return conflicts


def intact_checkpoint(paths: RunPaths, where: str) -> Path:
    """The checkpoint to resume from, verified against its manifest.

    'latest' falls back, with a warning, past corrupt checkpoints (moved aside as
    corrupt-step-N so no later run picks them) to the newest intact one; an explicit path
    must itself be intact."""
    if where != "latest":
        path = Path(where)
        if not (path / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"'{path}' is not a scatgen checkpoint (no trainer_state.json)")
        try:
            verify_manifest(path)
        except CorruptFileError as e:
            raise CorruptFileError(f"cannot resume from {path}: {e}; resume from another checkpoint "
                                   f"(--run.resume=latest falls back to the newest intact one)") from None
        return path
    candidates = paths.checkpoint_list()
    if not candidates:
        raise FileNotFoundError(f"--run.resume=latest: no checkpoint under {paths.checkpoints}; "
                                f"start the run without --run.resume")
    for path in reversed(candidates):
        try:
            verify_manifest(path)
            if not (path / TRAINER_STATE).is_file():
                raise CorruptFileError(f"'{path}' has no trainer_state.json")
            return path
        except CorruptFileError as e:
            aside = path.with_name(f"corrupt-{path.name}")
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
            warnings.warn(f"{e}; moved it to {aside.name} and falling back to the previous checkpoint",
                          CheckpointWarning, stacklevel=2)
    raise CorruptFileError(f"every checkpoint under {paths.checkpoints} is corrupt (moved to corrupt-step-*); "
                           f"start afresh with --run.overwrite=true")


def nonfinite_tensors(module: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers holding NaN or ±inf."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return [name for name, t in named if t.is_floating_point() and not torch.isfinite(t).all()]


def check_run_directory(cfg: Config, paths: RunPaths, clear: bool) -> Path | None:
    """The checkpoint to resume from (verified, its config compatible), or None for a fresh run,
    which may not start over another run's checkpoints or bundle unless told to (then, with
    `clear`, the old run's outputs are deleted)."""
    if cfg.run.resume:
        path = intact_checkpoint(paths, cfg.run.resume)
        trained = path / "config.yaml" if (path / "config.yaml").is_file() else paths.root / "config.yaml"
        if trained.is_file():
            conflicts = resume_conflicts(read_yaml(trained, "checkpoint config"), cfg)
            if conflicts:
                raise ValueError(
                    f"cannot resume from {path}: the config changes what it was trained on "
                    f"({'; '.join(conflicts)}). Resume with the checkpoint's values, or start a new run in "
                    f"another --run.out_dir")
        return path
    previous = [p for p in (paths.latest_checkpoint(), paths.model / "bundle.json") if p is not None and p.exists()]
    if previous and not cfg.run.overwrite:
        raise ValueError(
            f"run.out_dir '{paths.root}' already holds a run ({previous[0]}); continue it with "
            f"--run.resume=latest, replace it with --run.overwrite=true, or choose another --run.out_dir")
    if previous and clear:
        for old in (paths.checkpoints, paths.model, paths.images, paths.logs, paths.root / "metrics.json"):
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
    return None


def save_checkpoint(accelerator: Accelerator, paths: RunPaths, cfg: Config, state: dict) -> Path:
    """accelerate's state for step state['step'], the trainer's `state`, the config and a checksum
    manifest, written to a temporary folder and renamed into place; then all but the newest
    train.keep_checkpoints up to this step are deleted. Every rank calls it."""
    step = state["step"]
    final = paths.checkpoints / f"step-{step:07d}"
    tmp = paths.checkpoints / f".tmp-step-{step:07d}"
    main = accelerator.is_main_process
    if main:
        for stale in paths.checkpoints.glob(".tmp-step-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if main:
            (tmp / TRAINER_STATE).write_text(json.dumps(state))
            save_config(cfg, tmp / "config.yaml")
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
    finally:
        if main and tmp.exists():  # a failed write (disk full) leaves nothing behind
            shutil.rmtree(tmp, ignore_errors=True)
    if main:
        kept = [p for p in paths.checkpoint_list() if checkpoint_step(p) <= step]
        for old in kept[:-cfg.train.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict:
    """Restore accelerate's state from `path` (chosen and verified by check_run_directory) and
    return the trainer's state saved with it."""
    try:
        accelerator.load_state(str(path))
        state = json.loads((path / TRAINER_STATE).read_text())
        missing = [key for key in ("step", "train_seconds", "history") if key not in state]
        if missing:
            raise KeyError(f"{TRAINER_STATE} has no {', '.join(missing)}")
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"checkpoint '{path}' cannot be loaded ({str(e).splitlines()[0]}); resume from "
                         f"another checkpoint, or start afresh with --run.overwrite=true") from None
    return state


def set_aside_later(paths: RunPaths, step: int) -> list[str]:
    """Rename the checkpoints after `step` to superseded-step-N: they belong to a run that went on
    from there, and neither pruning nor a later --run.resume=latest may mix the two. → their names."""
    moved = []
    for later in paths.checkpoint_list():
        if checkpoint_step(later) > step:
            later.rename(later.with_name(f"superseded-{later.name}"))
            moved.append(later.name)
    return moved
