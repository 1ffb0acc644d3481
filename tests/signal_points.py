"""train.py or sample.py in a child process that sends itself a signal at one exact point of its work,
so that a test knows where the signal lands instead of polling the disk for a sign of that point.

    python tests/signal_points.py POINT SIGNAL SCRIPT ARGS...

POINT is one of
    locked        the run folder's lock is held (RunLock.acquire returned)
    spill         the first batch of scattering coefficients is in the whitening fit's spill file
    checkpoint    the first checkpoint is in place (Trainer.save_checkpoint returned)
    sample-write  the 11th single sample picture is being written, the first 10 being in place
SIGNAL is a name such as SIGKILL, SIGTERM or SIGSTOP; SCRIPT is train.py or sample.py.
"""

import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def popen_signalled(point: str, signum: signal.Signals, script: str, *args: str, env: dict | None = None):
    """Start SCRIPT ARGS in a child that sends itself `signum` at `point`; read it with communicate()."""
    return subprocess.Popen([sys.executable, __file__, point, signum.name, script, *args], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _install(point: str, signum: int) -> None:
    sent = []

    def send() -> None:  # once: a handled signal must not come again while the run unwinds
        if not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)

    if point == "locked":
        from scatgen.checkpoints import RunLock

        acquire = RunLock.acquire

        def hooked(self):
            acquire(self)
            send()

        RunLock.acquire = hooked
    elif point == "spill":
        from scatgen.coefficients import CoeffSpill

        write_through = CoeffSpill.write_through

        def hooked(self, stream):
            for item in write_through(self, stream):  # each batch is in the file before it is yielded
                send()
                yield item

        CoeffSpill.write_through = hooked
    elif point == "checkpoint":
        from scatgen.training import Trainer

        save_checkpoint = Trainer.save_checkpoint

        def hooked(self):
            path = save_checkpoint(self)
            send()
            return path

        Trainer.save_checkpoint = hooked
    elif point == "sample-write":
        from scatgen import pictures

        to_pil, calls = pictures.to_pil, []

        def hooked(picture):  # called by save_png inside its atomic_path block
            calls.append(None)
            if len(calls) == 11:
                send()
            return to_pil(picture)

        pictures.to_pil = hooked
    else:
        raise SystemExit(f"unknown point {point!r}")


if __name__ == "__main__":
    point, name, script, *script_args = sys.argv[1:]
    sys.path.insert(0, str(ROOT))  # this checkout's scatgen, as `python train.py` from ROOT imports it
    _install(point, getattr(signal, name))
    sys.argv = [script, *script_args]
    runpy.run_path(str(ROOT / script), run_name="__main__")
