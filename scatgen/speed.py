"""The training speed monitor: steps per second per logging window, and a warning when the
rate collapses because another process took the processor."""

from __future__ import annotations

import os
import sys
import time

import torch
from tqdm.auto import tqdm


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class StepRate:
    """Steps per second over each logging window, evaluation and checkpoint time excluded.

    `collapsed()` flags, once, a window at least SLOWDOWN times slower than the fastest one seen
    after the first (which holds the warm-up). A step's work is fixed, so its time varies by a few
    per cent; a drop of that size means something else took the processor (benchmarks/contention.py
    measures how much one busy neighbour costs)."""

    SLOWDOWN = 3.0

    def __init__(self, step: int) -> None:
        self.step, self.time, self.excluded = step, time.time(), 0.0
        self.windows, self.best, self.current, self.warned = 0, 0.0, 0.0, False

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def rate(self, step: int) -> float:
        now = time.time()
        self.current = (step - self.step) / max(now - self.time - self.excluded, 1e-9)
        self.windows += 1
        if self.windows > 1:
            self.best = max(self.best, self.current)
        self.step, self.time, self.excluded = step, now, 0.0
        return self.current

    def collapsed(self) -> bool:
        if self.warned or self.windows < 3 or self.current * self.SLOWDOWN > self.best:
            return False
        self.warned = True
        return True


def warn_slowdown(rate: StepRate) -> None:
    threads = torch.get_num_threads()
    tqdm.write(f"warning: training slowed to {rate.current:.1f} steps/s from {rate.best:.1f}; another busy process "
               f"is probably competing for the {usable_cores()} core(s) that torch's {threads} threads use. Stop it, "
               f"or start runs that share the machine with OMP_WAIT_POLICY=PASSIVE in the environment (beside one busy "
               f"process: 1.6× slower instead of 3.8×; alone: about 22% slower)",
               file=sys.stderr)


def budget_steps(step: int, first_step: int, total_steps: int, train_seconds: float, resumed_seconds: float,
                 max_minutes: float) -> int:
    """The step at which the run will end: max_steps, or sooner where the wall-clock budget binds,
    guessed from the rate since this process started (a window's rate would make the guess jump)."""
    mean_rate = (step - first_step) / max(train_seconds - resumed_seconds, 1e-9)
    left = 60 * max_minutes - train_seconds
    return max(step, min(total_steps, int(step + left * mean_rate)))
