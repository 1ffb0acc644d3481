"""Speed under a shared processor: the training speed monitor (steps per second per logging
window, and a warning when the rate collapses because another process took the processor), and
the thread governor that the entry points switch on (for runs that stop by the clock, and
evaluate: 1 and 2 threads round differently, so repeatable work keeps its count).

torch's threads wait for each other by spinning; beside one busy neighbour each op waits for the
thread the scheduler has preempted, and a 2-thread process on 2 cores runs 3.4-7x slower, where a
fair share would be 2x. One thread has no such cliff, but alone it is slower than two. The
governor measures both at run time and keeps the faster: the work loops (training steps, the
prior's fit, refinement) report their units of work, and every so often it tries the other
thread count for one window.

On a CPU with native bf16 (AVX-512 BF16, AMX) matrix products under bf16 autocast run faster;
without it they can run several times slower. `StepPrecision` times both in a loop's first steps
and keeps the faster, for the loops that run on the clock (G's training, the prior's fit)."""

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


class StepPrecision:
    """Whether a loop's steps run under bf16 autocast (`option`: the config key that chose `mode`).

    `auto` times both: the first steps alternate between float32 and bf16, PROBE of each, and the
    rest keep bf16 only if its median step is at least `margin` faster. A loop with no clock gains
    nothing from faster steps, and `auto` keeps it in float32 there, so that it is repeatable to
    the bit. The parameters stay float32 either way: autocast only computes in bf16."""

    PROBE = 12

    def __init__(self, mode: str, timed: bool, device_type: str, option: str = "mixed_precision",
                 margin: float = 1.1) -> None:
        if mode not in ("auto", "no", "bf16"):
            raise ValueError(f"{option} must be auto, no or bf16, got {mode!r}")
        self.device_type, self.margin = device_type, margin
        self.choices = [False, True] if mode == "auto" and timed else [mode == "bf16"]
        self.seconds: dict[bool, list[float]] = {False: [], True: []}
        self.medians: dict[bool, float] = {}  # each precision's median step, once both are probed

    @property
    def settled(self) -> bool:
        return len(self.choices) == 1

    def next(self) -> bool:
        """The precision of the next step (True: bf16)."""
        if self.settled:
            return self.choices[0]
        return len(self.seconds[False]) > len(self.seconds[True])  # alternate, float32 first

    def timed(self, bf16: bool, seconds: float) -> None:
        """Record a step's seconds; once both are probed, keep the faster."""
        if self.settled:
            return
        self.seconds[bf16].append(seconds)
        if min(len(v) for v in self.seconds.values()) >= self.PROBE:
            self.medians = {k: sorted(v)[len(v) // 2] for k, v in self.seconds.items()}
            self.choices = [self.medians[True] * self.margin < self.medians[False]]

    def step_done(self, bf16: bool, started: float) -> None:
        """A step that began at time.perf_counter() = `started` has ended; timed while probing."""
        if self.settled:
            return
        if self.device_type == "cuda":
            torch.cuda.synchronize()  # a GPU step's time is its kernels', not their launch's
        self.timed(bf16, time.perf_counter() - started)

    @property
    def speedup(self) -> float | None:
        """float32's median step time over bf16's, where both were timed."""
        return self.medians[False] / self.medians[True] if self.medians else None

    def autocast(self, bf16: bool):
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=bf16)


def describe_precision(precision: StepPrecision) -> str:
    """"bf16" or "float32", with the timed ratio where `auto` measured one."""
    if not precision.settled:
        return "float32 and bf16 (the loop ended while timing them)"
    name = "bf16" if precision.next() else "float32"
    return name if precision.speedup is None else f"{name} (bf16 steps timed {precision.speedup:.2f}x faster)"


class ThreadGovernor:
    """Keeps torch at whichever of 1 and n threads (n: torch's count when it starts) has the
    higher measured rate of work.

    Work is counted in windows of at least `window_s`. Every `probe_every` windows the other count
    is tried for one window, and kept if its rate beats the current count's last one by `gain`;
    a window at n threads that runs `collapse` times slower than the last one at n is a neighbour
    arriving, and starts a probe at once. With a neighbour arriving or leaving, the count follows
    within about one probe period. A gap between two units of more than `idle` times the usual
    one (the loop paused: an evaluation, a checkpoint, the caller's own work) starts a new window
    instead of counting as slow work."""

    def __init__(self, window_s: float = 0.5, probe_every: int = 10, gain: float = 1.1, collapse: float = 2.0,
                 idle: float = 10.0, clock=time.perf_counter, set_threads=torch.set_num_threads,
                 threads: int | None = None) -> None:
        self.full = threads or torch.get_num_threads()
        self.window_s, self.probe_every, self.gain, self.collapse, self.idle = window_s, probe_every, gain, collapse, idle
        self.clock, self.set_threads = clock, set_threads
        self.threads, self.rate = self.full, {}  # threads → rate of its last window
        self.units, self.ticks, self.windows, self.probing = 0.0, 0, 0, None
        self.start = self.last = clock()
        self.interval: float | None = None  # seconds between ticks in the last window
        self.warm = False
        self.switches = 0

    def tick(self, units: float = 1.0) -> None:
        """Count `units` of work just done; at the end of a window, maybe change the thread count."""
        now = self.clock()
        gap, self.last = now - self.last, now
        if self.interval is not None and gap > self.idle * max(self.interval, 1e-3):
            self.units, self.ticks, self.start = 0.0, 0, now  # the loop was paused, not slow
            return
        self.units += units
        self.ticks += 1
        elapsed = now - self.start
        if elapsed < self.window_s or self.full == 1:
            return
        self.interval = elapsed / self.ticks
        if not self.warm:  # the first window holds the loop's warm-up
            self.warm = True
            self.units, self.ticks, self.start = 0.0, 0, now
            return
        rate, threads = self.units / elapsed, self.threads
        previous = self.rate.get(threads)
        self.rate[threads] = rate
        self.windows += 1
        other = 1 if threads == self.full else self.full
        if self.probing is not None:  # this window was a probe of `threads`: keep it or go back
            if rate < self.gain * self.rate[self.probing]:
                self._use(self.probing)
            self.probing = None
        elif (self.windows % self.probe_every == 0 or other not in self.rate
              or (threads == self.full and previous is not None and rate * self.collapse < previous)):
            self.probing = threads
            self._use(other)
        self.units, self.ticks, self.start = 0.0, 0, self.clock()

    def _use(self, threads: int) -> None:
        if threads != self.threads:
            self.set_threads(threads)
            self.threads = threads
            self.switches += 1


_governor: ThreadGovernor | None = None


def govern_threads() -> ThreadGovernor | None:
    """Switch the thread governor on for this process (the entry points do; a library user's
    process keeps its own settings). Off where OMP_NUM_THREADS is set: a user's choice wins."""
    global _governor
    if _governor is None and not os.environ.get("OMP_NUM_THREADS") and torch.get_num_threads() > 1:
        _governor = ThreadGovernor()
    return _governor


def work_done(units: float = 1.0) -> None:
    """What work loops call after each unit of work; nothing unless the governor is on."""
    if _governor is not None:
        _governor.tick(units)


def warn_slowdown(rate: StepRate) -> None:
    threads = torch.get_num_threads()
    if _governor is None and os.environ.get("OMP_NUM_THREADS"):
        advice = ("or unset OMP_NUM_THREADS, so that scatgen's commands pick 1 or more threads by measured speed "
                  "(benchmarks/contention.py: 1.3-2x slower beside one busy process instead of 3.5-4x)")
    else:
        advice = "or give this run more cores; OMP_WAIT_POLICY=PASSIVE in the environment also softens the cliff"
    tqdm.write(f"warning: training slowed to {rate.current:.1f} steps/s from {rate.best:.1f}; another busy process "
               f"is probably competing for the {usable_cores()} core(s) that torch's {threads} thread(s) use. "
               f"Stop it, {advice}", file=sys.stderr)


def budget_steps(step: int, first_step: int, total_steps: int, train_seconds: float, resumed_seconds: float,
                 max_minutes: float) -> int:
    """The step at which the run will end: max_steps, or sooner where the wall-clock budget binds,
    guessed from the rate since this process started (a window's rate would make the guess jump)."""
    mean_rate = (step - first_step) / max(train_seconds - resumed_seconds, 1e-9)
    left = 60 * max_minutes - train_seconds
    return max(step, min(total_steps, int(step + left * mean_rate)))
