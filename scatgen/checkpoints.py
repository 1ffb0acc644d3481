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
import os
import shutil
import warnings
from pathlib import Path

import torch

from scatgen.config import Config, config_to_dict, flatten_keys
from scatgen.integrity import CorruptFileError, verify_manifest
from scatgen.utils import lock_file

# What a resumed run may change: step budgets, cadences, the optimiser's step size, and the
# stages after training. Everything else changes the model, its data or its codes.
RESUMABLE = (
    "train.lr", "train.weight_decay", "train.grad_clip", "train.max_steps", "train.epochs", "train.max_minutes",
    "train.eval_every", "train.eval_images", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.grid_size", "train.num_workers", "train.mixed_precision", "train.compile", "encoder.compile",
    "encoder.batch_size", "data.cache_images",
    "run.out_dir", "run.cache_dir", "run.resume", "run.overwrite",
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
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"'{path}' is not a scatgen checkpoint (no trainer_state.json)")
        try:
            verify_manifest(path, required=False)
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
            verify_manifest(path, required=False)
            if not (path / "trainer_state.json").is_file():
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
