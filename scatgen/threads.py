"""How scatgen's own commands wait for work on the processor: set before torch loads.

torch runs CPU ops on a team of OpenMP threads (libgomp in the Linux PyPI wheels). By default a
thread that has finished its share of an op spins for a while before it sleeps, so that the next
op starts without a wake-up. Alone on the machine that is a small gain; beside another busy
process the spinning threads take cores that process needs, and each op waits for whichever of
its threads the scheduler has set aside. Measured on 2 cores with 2 torch threads (issue 22): the
end-of-run prior fit fell from 42 to 7 it/s as soon as one other CPU-bound Python process
started, where a fair share would be about half. OMP_WAIT_POLICY=PASSIVE makes a waiting thread
sleep at once; benchmarks/contention.py measures what that costs alone and gains beside a
neighbour.

OpenMP reads its environment once, when torch's libraries load, so `configure_threads()` must
run before the first `import torch` of the process: train.py, sample.py and the `scatgen`
command (scatgen.cli.main) call it first thing, and the package's __init__ imports nothing
heavy so that `import scatgen.cli` does not load torch. The library never calls it: a process
that imports scatgen keeps the settings it chose, and a value already in the environment (the
user's OMP_WAIT_POLICY=ACTIVE, say) wins. Child processes (accelerate launch, DataLoader
workers) inherit the setting.

The thread count stays torch's default, one per usable core (an explicit OMP_NUM_THREADS or
torch.set_num_threads still decides). Sizing it to the cores left free by other processes at
start-up was considered and left out: the 1-minute load average lags (a neighbour started a
few seconds earlier hardly shows), counts the whole host inside a container, and a run that
sized itself beside a short job would keep the smaller count long after the job ended.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# What the entry points add to a process's environment where it holds no value of its own.
ENTRY_POINT_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE"}


def entry_point_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of env (default: os.environ) with ENTRY_POINT_SETTINGS added where env has no value:
    the environment torch loads under when a scatgen command starts (benchmarks launch with it)."""
    out = dict(os.environ if env is None else env)
    for name, value in ENTRY_POINT_SETTINGS.items():
        out.setdefault(name, value)
    return out


def configure_threads() -> bool:
    """Add ENTRY_POINT_SETTINGS to os.environ where it has no value, if torch is not loaded yet.

    For entry points only, first thing. Returns whether the settings can still take effect;
    False (and os.environ untouched) once torch is loaded: its OpenMP runtime has read the
    environment already, and the process that loaded it (a test, a notebook calling
    scatgen.cli.main) keeps its own settings."""
    if "torch" in sys.modules:
        return False
    for name, value in ENTRY_POINT_SETTINGS.items():
        os.environ.setdefault(name, value)
    return True
