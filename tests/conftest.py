import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tiny_overrides(tmp_path: Path, **extra) -> dict[str, str]:
    """A config that trains end to end in seconds on CPU."""
    cfg = {
        "data.name": "polygons", "data.image_size": "32", "data.num_train": "256", "data.num_test": "64",
        "encoder.J": "3", "encoder.L": "4", "encoder.batch_size": "64",
        "whitening.d": "32",
        "generator.kind": "gsn", "generator.channels": "32", "generator.min_channels": "8",
        "train.batch_size": "32", "train.max_steps": "12", "train.warmup_steps": "2",
        "train.eval_every": "6", "train.eval_images": "32", "train.log_every": "3",
        "train.checkpoint_every": "6", "train.keep_checkpoints": "3", "train.grid_size": "8",
        "prior.fit_steps": "40", "prior.width": "64", "prior.depth": "1", "prior.sample_steps": "4",
        "prior.latent": "8", "prior.autoencoder_steps": "40",
        "refine.steps": "3", "refine.sample_steps": "0",  # 0: as refine.steps (the polygons config sets 100)
        "run.out_dir": str(tmp_path / "run"), "run.cache_dir": str(tmp_path / "cache"),
    }
    cfg.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    return cfg


def as_args(overrides: dict[str, str]) -> list[str]:
    return [f"--{k}={v}" for k, v in overrides.items()]


@pytest.fixture
def tiny(tmp_path):
    return tiny_overrides(tmp_path)


def run_script(*args: str, timeout: int = 300, env: dict | None = None):
    import subprocess

    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """One tiny trained run (with a flow prior) shared by every test that only reads it. Those tests are
    marked slow: whichever comes first waits for the training."""
    from scatgen.config import load_config
    from scatgen.training import Trainer

    tmp = tmp_path_factory.mktemp("trained")
    Trainer(load_config(None, tiny_overrides(tmp)), progress=False).train()
    return tmp / "run"


@pytest.fixture(autouse=True)
def no_thread_governor_across_tests():
    """A command run in-process (`evaluate`, a budgeted `train`) switches the process-wide thread
    governor on; without this, it would go on changing torch's thread count in later tests, whose
    bit-exact comparisons (1 and 2 threads round differently) would then depend on test order."""
    import torch

    from scatgen import speed

    threads = torch.get_num_threads()
    yield
    speed._governor = None
    torch.set_num_threads(threads)
