"""Throughput beside one busy neighbour process, with OpenMP's default waiting (spin, then sleep),
with passive waiting (OMP_WAIT_POLICY=PASSIVE), and with the thread governor of the entry points.

    python benchmarks/contention.py --json contention.json  # 3 variants × 3 workloads × 2 rounds × 3 phases
                                                            # of 6 s, plus start-up: about 7 minutes
    python benchmarks/contention.py --seconds 8 --rounds 3 --variants before after
    python benchmarks/contention.py --variants before governed --rounds 3
    python benchmarks/contention.py --smoke                 # tiny sizes, 2 variants: checks that it runs

Workloads, each counted in its own unit of work:
    train   optimizer steps of the default generator (configs/polygons.yaml: its generator, batch,
            loss, AdamW and gradient clipping) on random codes and images; no data loading
    prior   fit steps of fit_prior(kind='flow', the default width and depth) on random codes (10000, 512)
    refine  gradient evaluations of refine_reconstructions (L-BFGS) on 16 random 32² images, J=3, L=8

Neighbours:
    scatgen the train workload without end, in a process with the same variant's settings
            (two scatgen commands side by side)
    numpy   a plain single-threaded NumPy loop (elementwise sin and multiply on 8 MB arrays, the
            environment as it is): someone else's Python script

Variants, the environment torch loads under in every scatgen process of a measurement:
    before          the environment as it is (OpenMP's default: spin a while, then sleep)
    after           OMP_WAIT_POLICY=PASSIVE: a waiting OpenMP thread sleeps at once
    after, 1 thread also OMP_NUM_THREADS=1: what sizing torch's threads to the free cores would give
    short spin      OMP_WAIT_POLICY unset, GOMP_SPINCOUNT=10000: a waiting thread spins briefly, then sleeps
    governed        the environment as it is, and scatgen.speed's thread governor on, as train.py
                    switches it on for a run with a time budget (the neighbour scatgen too)

Every (variant, workload) is one fresh worker process, which times --rounds rounds of three
phases: alone, beside scatgen, beside numpy. A variant's workers and its two neighbours start
and warm up together; then the workers wait idle for their turn, and the neighbours are held
stopped (SIGSTOP) except during the phase measured against them (SIGCONT, then a short
settle). A worker runs one untimed chunk before its first phase. A phase runs whole chunks of
work for at least --seconds; its rate is units per wall second, the table gives the median over
rounds and slowdown = alone / beside. CPU use is the worker's CPU seconds per wall second, all
threads (2.0: two cores busy): waiting threads that spin show as CPU use without speed. Run it
on an otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


WORKLOADS = {"train": "steps/s", "prior": "fit steps/s", "refine": "evaluations/s"}
NEIGHBOURS = ("scatgen", "numpy")
VARIANTS = ("before", "after", "after, 1 thread", "short spin", "governed")
GOVERN = "SCATGEN_BENCH_GOVERN"  # set in a variant's environment: its workers switch the governor on
SETTLE_S = {False: 0.5, True: 0.1}  # after SIGCONT, so that the neighbour runs at full tilt when a phase starts

# Sizes of one unit of work (and warm-up units): full, and --smoke.
SIZES = {
    False: dict(batch=None, codes=10_000, prior_chunk=10, images=16, refine_chunk=10, warmup=5),
    True: dict(batch=4, codes=500, prior_chunk=2, images=2, refine_chunk=2, warmup=1),
}


# ----------------------------------------------------------------------------- workers


def build_work(kind: str, smoke: bool):
    """A function doing one chunk of the workload and returning how many units it did."""
    import torch

    from scatgen.config import PriorConfig, RefineConfig, load_config
    from scatgen.generators import build_generator
    from scatgen.prior import fit_prior
    from scatgen.refinement import refine_reconstructions
    from scatgen.scattering import Scattering
    from scatgen.speed import work_done

    size = SIZES[smoke]
    cfg = load_config(ROOT / "configs/polygons.yaml")
    gen = torch.Generator().manual_seed(0)
    n = cfg.data.image_size
    if kind == "train":
        t = cfg.train
        batch = size["batch"] or t.batch_size
        model = build_generator(cfg.generator, code_dim=cfg.whitening.d, image_size=n, J=cfg.encoder.J,
                                L=cfg.encoder.L)
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        batches = [(torch.randn(batch, cfg.whitening.d, generator=gen),
                    torch.rand(batch, 3, n, n, generator=gen) * 2 - 1) for _ in range(8)]
        model.train()
        state = {"i": 0}

        def work() -> int:  # a step of Trainer._train on CPU, without data loading and logging
            codes, images = batches[state["i"] % len(batches)]
            state["i"] += 1
            _, loss = model(codes, images, loss=t.loss)
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            hook = getattr(model, "after_optimizer_step", None)
            if hook is not None:
                hook()
            work_done()  # as Trainer._train does after each step (the prior and refinement do it inside)
            return 1

        return work
    if kind == "prior":
        codes = torch.randn(size["codes"], cfg.whitening.d, generator=gen)
        prior_cfg = PriorConfig(kind="flow", fit_steps=size["prior_chunk"])

        def work() -> int:  # a short fit, its model's construction included (alike in every variant)
            fit_prior(codes, prior_cfg, seed=0)
            return prior_cfg.fit_steps

        return work
    if kind == "refine":
        cache = Path(tempfile.gettempdir()) / "scatgen-filter-cache"
        scattering = Scattering(J=3, image_size=32, L=8, cache_dir=cache)
        images = torch.rand(size["images"], 3, 32, 32, generator=gen) * 2 - 1
        start = (images + 0.3 * torch.randn(images.shape, generator=gen)).clamp(-1, 1)
        refine_cfg = RefineConfig(steps=size["refine_chunk"])

        def work() -> int:
            refine_reconstructions(scattering, start, images, refine_cfg)
            return refine_cfg.steps

        return work
    raise ValueError(f"unknown workload {kind!r}; expected one of {', '.join(WORKLOADS)}")


def numpy_work():
    import numpy as np

    a = np.random.default_rng(0).random(1_000_000)
    b = np.empty_like(a)

    def work() -> int:
        np.sin(a, out=b)
        np.multiply(b, 1.0001, out=a)
        return 1

    return work


def measure(work, seconds: float) -> dict[str, float]:
    """Whole chunks of work for at least `seconds`: units per wall second and CPU use."""
    units, cpu0, t0 = 0, time.process_time(), time.perf_counter()
    while True:
        units += work()
        wall = time.perf_counter() - t0
        if wall >= seconds:
            break
    torch = sys.modules.get("torch")  # the thread count at the phase's end (the governor changes it)
    return {"rate": units / wall, "cpu": (time.process_time() - cpu0) / wall, "units": units, "wall_s": wall,
            "threads_at_end": torch.get_num_threads() if torch else 1}


def worker(kind: str, smoke: bool, forever: bool) -> None:
    """Warm up, say so on stdout, then either work without end (a neighbour) or answer each line on
    stdin with a JSON line: 'warm' (one untimed chunk) or 'measure SECONDS' (one timed phase)."""
    if os.environ.get(GOVERN) and kind != "numpy":
        from scatgen.speed import govern_threads

        govern_threads()
    work = numpy_work() if kind == "numpy" else build_work(kind, smoke)
    for _ in range(SIZES[smoke]["warmup"]):
        work()
    info = {"ready": True, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}
    if kind != "numpy":
        import torch

        info["threads"] = torch.get_num_threads()
    print(json.dumps(info), flush=True)
    if forever:
        parent = os.getppid()
        while os.getppid() == parent:  # a neighbour must not outlive a driver killed without clean-up
            work()
        return
    for line in sys.stdin:
        command = line.split()
        if command == ["warm"]:
            work()
            print(json.dumps({"warm": True}), flush=True)
        elif command[:1] == ["measure"]:
            print(json.dumps(measure(work, float(command[1]))), flush=True)
        else:
            break


# ----------------------------------------------------------------------------- driver


class Process:
    """A worker subprocess: started with an environment, read line by line, stopped and continued."""

    def __init__(self, kind: str, env: dict[str, str], smoke: bool, forever: bool = False) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind]
        cmd += ["--smoke"] if smoke else []
        cmd += ["--forever"] if forever else []
        self.kind, self.errors = kind, tempfile.TemporaryFile("w+")  # a file: a full pipe would block the worker
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errors, text=True, cwd=ROOT)
        self.ready: dict | None = None

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.errors.seek(0)
            raise RuntimeError(f"worker '{self.kind}' exited with status {self.proc.returncode}:\n"
                               f"{self.errors.read()[-3000:]}")
        return json.loads(line)

    def wait_ready(self) -> dict:
        self.ready = self.read()
        return self.ready

    def measure(self, seconds: float) -> dict:
        return self.ask(f"measure {seconds}")

    def warm(self) -> dict:
        return self.ask("warm")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Stop it if it still runs; closing twice is harmless."""
        if self.proc.poll() is None:
            self.resume()  # a stopped process would not act on SIGTERM until continued
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.errors.close()


def variant_environment(variant: str) -> dict[str, str]:
    if variant == "before":
        return dict(os.environ)
    if variant == "governed":
        return dict(os.environ, **{GOVERN: "1"})
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    if variant == "after, 1 thread":
        env["OMP_NUM_THREADS"] = "1"
    elif variant == "short spin":  # libgomp's default wait, spinning 10k rounds instead of 300k before sleeping
        env = dict(os.environ, GOMP_SPINCOUNT="10000")
    elif variant != "after":
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return env


def start_variant(variant: str, workloads: list[str], smoke: bool) -> dict[str, Process]:
    """Every process of a variant at once, its two neighbours and one worker per workload: their
    start-up and warm-up overlap (untimed), so the run spends its time measuring."""
    env = variant_environment(variant)
    procs = {"scatgen": Process("train", env, smoke, forever=True),
             "numpy": Process("numpy", dict(os.environ), smoke, forever=True)}
    procs.update({kind: Process(kind, env, smoke) for kind in workloads})
    return procs


def run_variant(variant: str, procs: dict[str, Process], workloads: list[str], args: argparse.Namespace) -> dict:
    """{workload: {'threads': n, 'alone'|'scatgen'|'numpy': [phase result per round]}}."""
    results = {}
    try:
        for name, proc in procs.items():
            proc.wait_ready()
            if name in NEIGHBOURS:
                proc.pause()  # the workers wait on stdin and take no processor time
        neighbours = {name: procs[name] for name in NEIGHBOURS}
        for kind in workloads:
            proc = procs[kind]
            proc.warm()  # its caches went cold while the others warmed up
            phases: dict = {"threads": proc.ready["threads"], "omp_wait_policy": proc.ready["omp_wait_policy"],
                            "alone": [], **{name: [] for name in NEIGHBOURS}}
            for _ in range(args.rounds):
                phases["alone"].append(proc.measure(args.seconds))
                for name, neighbour in neighbours.items():
                    neighbour.resume()
                    time.sleep(SETTLE_S[args.smoke])
                    try:
                        phases[name].append(proc.measure(args.seconds))
                    finally:
                        neighbour.pause()
            results[kind] = phases
            proc.close()
            print(f"  done: {variant}, {kind}", file=sys.stderr, flush=True)
    finally:
        for proc in procs.values():
            proc.close()
    return results


def median(phases: list[dict], key: str = "rate") -> float:
    return statistics.median(p[key] for p in phases)


def spread(phases: list[dict]) -> float:
    rates = [p["rate"] for p in phases]
    return (max(rates) - min(rates)) / statistics.median(rates)


def report(results: dict, workloads: list[str], variants: list[str], rounds: int) -> None:
    def cell(variant: str, kind: str, neighbour: str) -> list[str]:
        phases = results[variant][kind]
        alone, beside = median(phases["alone"]), median(phases[neighbour])
        return [f"{alone:.1f}", f"{beside:.1f}", f"{alone / beside:.1f}×"]

    print(f"\nrates (median of {rounds} round(s)); slowdown = alone / beside\n")
    head = "".join(f" {v}: alone | {v}: beside | {v}: slowdown |" for v in variants)
    print(f"| workload | unit | neighbour |{head}")
    print("|---|---|---|" + "---|" * 3 * len(variants))
    for kind in workloads:
        for neighbour in NEIGHBOURS:
            cells = [c for v in variants for c in cell(v, kind, neighbour)]
            print(f"| {kind} | {WORKLOADS[kind]} | {neighbour} | " + " | ".join(cells) + " |")
    print("\nworker CPU use, cores busy (CPU seconds per wall second, all threads)\n")
    print("| workload | variant | torch threads (at start; at the end of each phase) | alone | beside scatgen | beside numpy |")
    print("|---|---|---|---|---|---|")
    for kind in workloads:
        for v in variants:
            phases = results[v][kind]
            ends = " / ".join(",".join(str(r.get("threads_at_end", "?")) for r in phases[p]) for p in ("alone", *NEIGHBOURS))
            print(f"| {kind} | {v} | {phases['threads']}; {ends} | " +
                  " | ".join(f"{median(phases[p], 'cpu'):.2f}" for p in ("alone", *NEIGHBOURS)) + " |")
    if rounds > 1:
        noisy = [f"{v}, {kind}, {p}: {spread(results[v][kind][p]):.0%}" for v in variants for kind in workloads
                 for p in ("alone", *NEIGHBOURS) if spread(results[v][kind][p]) > 0.2]
        if noisy:
            print("\nspread (max − min) / median above 20% between rounds (the machine was not quiet?): "
                  + "; ".join(noisy))


def machine() -> dict:
    import torch

    from scatgen.evaluation import cpu_or_gpu_name
    from scatgen.speed import usable_cores

    return {"cpu": cpu_or_gpu_name(torch.device("cpu")).split(", ")[0], "usable_cores": usable_cores(),
            "default_torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": sys.version.split()[0],
            "environment": {k: os.environ.get(k, "") for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                                                "GOMP_SPINCOUNT", "MKL_NUM_THREADS")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=6.0, help="length of each timed phase")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (alone, beside scatgen, beside numpy)")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                   help="default: all of them (with --smoke: before and after)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 0.3 s phases, one round: checks that it runs")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", choices=[*WORKLOADS, "numpy"], help=argparse.SUPPRESS)
    p.add_argument("--forever", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.smoke, args.forever)
        return
    if args.seconds <= 0 or args.rounds < 1:
        p.error("--seconds must be > 0 and --rounds >= 1")
    if args.smoke:
        args.seconds, args.rounds = 0.3, 1
    variants = args.variants or (["before", "after"] if args.smoke else list(VARIANTS))

    # SIGTERM (timeout, kill) unwinds like Ctrl-C, so that the neighbours are stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    load, tic = os.getloadavg(), time.perf_counter()  # before this run adds to the load
    procs = start_variant(variants[0], args.workloads, args.smoke)  # starts up while the driver looks around
    try:
        measure_all(procs, variants, args, load, tic)
    finally:
        for proc in procs.values():  # closed already unless something failed
            proc.close()


def measure_all(first: dict[str, Process], variants: list[str], args: argparse.Namespace,
                load: tuple[float, float, float], tic: float) -> None:
    info = machine()
    info["load_average_at_start"] = load
    print(f"CPU: {info['cpu']}, {info['usable_cores']} usable cores, torch {info['torch']} with "
          f"{info['default_torch_threads']} threads by default; load average at start "
          f"{', '.join(f'{v:.2f}' for v in load)}")
    if load[0] > 0.5:
        print(f"note: the 1-minute load average is {load[0]:.2f}: something else is busy, and the rates "
              f"'alone' are not")
    print("environment as it is: " + ", ".join(f"{k}={v or '(unset)'}" for k, v in info["environment"].items()))
    if info["environment"]["OMP_WAIT_POLICY"]:
        print("note: OMP_WAIT_POLICY is set already, so 'before' waits as 'after' does; unset it to measure "
              "OpenMP's default")
    if args.smoke:
        print("smoke run: tiny sizes, numbers mean nothing")
    results = {}
    for v in variants:
        procs = first if v == variants[0] else start_variant(v, args.workloads, args.smoke)
        results[v] = run_variant(v, procs, args.workloads, args)
    report(results, args.workloads, variants, args.rounds)
    print(f"\n{time.perf_counter() - tic:.0f} s in all; load average at end "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "seconds": args.seconds, "rounds": args.rounds,
                                         "smoke": args.smoke, "units": WORKLOADS, "results": results}, indent=2))
        print(f"results: {args.json}")


if __name__ == "__main__":
    main()
