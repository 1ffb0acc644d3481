"""Where refinement's time goes, on a trained run, and how many evaluations reach a PSNR: the
scattering's forward and backward against the whole L-BFGS refinement, for each refine.balance,
step count and batch size, with the PSNR each reaches; with --ref, against another commit's
refinement measured in the same run.

    python benchmarks/refinement_cost.py runs/polygons --steps 15 20 25 30 40 50 --codes
    python benchmarks/refinement_cost.py runs/polygons --batch-sizes 32 64 128 --balances 0.5
    python benchmarks/refinement_cost.py runs/polygons --ref 72b8649 --balances 0.5 --steps 20 30 40 50

Refines the G outputs of the first n test images towards their full S_J x (as `reconstruct`
does). Each tree refines in its own process (benchmarks/refine_worker.py), warmed up once, and
at each step count every series runs in turn (the reference commit at its own defaults, then
each balance of this tree), so that a slow spell of the VM hits all of them; the driver scores
them all with the same PSNR. Prints, with the CPU and torch's thread count: the seconds per
image of one forward and backward of S_J alone (batch 64), a row per (series, batch, steps) with
the mean test PSNR and seconds per image, and, for each series, the evaluations and seconds that
reach --bar dB (interpolated between the step counts) with their ratio to the first series'.
--codes adds rows for the test codes refined with the code objective (G(z) → L S_J x = z), which
balance does not touch."""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import scatgen  # noqa: E402
from scatgen.data import load_split  # noqa: E402
from scatgen.evaluation import _stack, _timed as timed, cpu_or_gpu_name  # noqa: E402
from scatgen.metrics import psnr  # noqa: E402
from scatgen.pictures import to_unit  # noqa: E402
from scatgen.refinement import refine_decodings  # noqa: E402


def scattering_seconds(scattering, images: torch.Tensor, repeats: int = 5) -> float:
    """Seconds of one forward and backward of ‖S_J x‖² over the batch, median of `repeats`."""
    x = images.clone().requires_grad_(True)
    scattering(x).square().sum().backward()  # warm-up: allocator, FFT plans
    times = []
    for _ in range(repeats):
        x.grad = None
        tic = time.perf_counter()
        scattering(x).square().sum().backward()
        times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def crossing(points: list[tuple[int, float, float]], bar: float) -> tuple[float, float] | None:
    """(evaluations, s / image) where the PSNR first reaches `bar`, linearly interpolated between
    the measured (steps, dB, s / image) points; None if no point reaches it."""
    points = sorted(points)
    for i, (steps, db, seconds) in enumerate(points):
        if db >= bar:
            if i == 0:
                return float(steps), seconds
            s0, d0, t0 = points[i - 1]
            u = (bar - d0) / (db - d0)
            return s0 + u * (steps - s0), t0 + u * (seconds - t0)
    return None


class TreeRefiner:
    """refine_reconstructions of one source tree, in a warmed-up worker process."""

    def __init__(self, label: str, tree: Path, data: Path) -> None:
        self.label, self.work = label, data.parent
        self.errors = tempfile.TemporaryFile("w+")  # a file: a full pipe would block the worker
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "refine_worker.py"), str(tree),
                                      str(data)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errors, text=True)
        self.source = self._answer()["scatgen"]

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.errors.seek(0)
            raise RuntimeError(f"the {self.label} worker failed (status {self.proc.returncode}):\n"
                               f"{self.errors.read()[-3000:]}")
        return json.loads(line)

    def refine(self, **cfg) -> tuple[torch.Tensor, float]:
        out = self.work / f"refined-{self.label}.pt"
        self.proc.stdin.write(json.dumps({"cfg": cfg, "out": str(out)}) + "\n")
        self.proc.stdin.flush()
        seconds = self._answer()["seconds"]
        return torch.load(out), seconds

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.errors.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=128, help="test images")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--steps", type=int, nargs="+", default=[50], help="gradient evaluations")
    parser.add_argument("--balances", type=float, nargs="+", default=[0.0, 0.5],
                        help="refine.balance values (0 = the plain ‖S_J x − S_J x_t‖²)")
    parser.add_argument("--ref", help="a git revision whose refinement (at its own defaults) runs beside this tree's")
    parser.add_argument("--bar", type=float, default=34.0, help="PSNR at which to compare the series")
    parser.add_argument("--codes", action="store_true",
                        help="also refine the test codes (the code objective, which balance does not change)")
    args = parser.parse_args()

    pipe = scatgen.load(args.run)
    images = _stack(load_split(pipe, "test"), 128)[:args.n]
    codes = pipe.encode(images)
    start = pipe.decode(codes, refine=0)
    scattering = pipe.scattering
    print(f"run {args.run}, {len(images)} test images, {cpu_or_gpu_name(pipe.device)}")
    per_call = scattering_seconds(scattering, start[:64]) / len(start[:64])
    print(f"G alone: {psnr(to_unit(start), to_unit(images)).mean():.2f} dB; S_J forward + backward: "
          f"{per_call * 1000:.2f} ms per image\n")

    work = Path(tempfile.mkdtemp(prefix="scatgen-refinement-cost-"))
    refiners: dict[str, TreeRefiner] = {}
    try:
        data = work / "data.pt"
        torch.save({"start": start, "images": images, "J": scattering.J, "L": scattering.L,
                    "size": pipe.image_size}, data)
        if args.ref:
            subprocess.run(["git", "worktree", "add", "--detach", str(work / "ref"), args.ref], cwd=ROOT,
                           check=True, capture_output=True)
            refiners["ref"] = TreeRefiner("ref", work / "ref", data)
        refiners["this"] = TreeRefiner("this", ROOT, data)
        series = ([(f"{args.ref} (ref, its defaults)", "ref", {})] if args.ref else []) + [
            (f"balance {b:g}", "this", {"balance": b}) for b in args.balances]
        for name, tree, _ in series:
            print(f"{name}: {refiners[tree].source}")
        print("\n| target | series | batch | steps | refined PSNR (dB) | s / image | of which S_J f+b (steps × per image) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        curves: dict[str, list[tuple[int, float, float]]] = {name: [] for name, _, _ in series}
        for steps in args.steps:
            for batch in args.batch_sizes:
                for name, tree, settings in series:
                    refined, seconds = refiners[tree].refine(steps=steps, batch_size=batch, **settings)
                    seconds /= len(images)
                    db = psnr(to_unit(refined), to_unit(images)).mean().item()
                    if batch == args.batch_sizes[0]:
                        curves[name].append((steps, db, seconds))
                    print(f"| S_J x | {name} | {batch} | {steps} | {db:.2f} | {seconds:.3f} | "
                          f"{steps * per_call / seconds:.0%} |", flush=True)
                if args.codes:
                    cfg = replace(pipe.cfg.refine, steps=steps, batch_size=batch)
                    refined, seconds = timed(refine_decodings, pipe.encoder, start, codes, cfg)
                    seconds /= len(images)
                    print(f"| code | this | {batch} | {steps} | {psnr(to_unit(refined), to_unit(images)).mean():.2f} | "
                          f"{seconds:.3f} | {steps * per_call / seconds:.0%} |", flush=True)
    finally:
        for refiner in refiners.values():
            refiner.close()
        if args.ref:
            subprocess.run(["git", "worktree", "remove", "--force", str(work / "ref")], cwd=ROOT, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nto reach {args.bar:g} dB on test reconstructions (batch {args.batch_sizes[0]}, interpolated):")
    reached = {name: crossing(points, args.bar) for name, points in curves.items()}
    for name, hit in reached.items():
        print(f"  {name}: " + ("not reached in the steps measured" if hit is None
                               else f"{hit[0]:.1f} evaluations, {hit[1]:.3f} s / image"))
    first, reference = next(iter(reached.items()))
    for name, hit in list(reached.items())[1:]:
        if reference and hit:
            print(f"  {name} against {first}: {reference[0] / hit[0]:.2f}x fewer evaluations, "
                  f"{reference[1] / hit[1]:.2f}x less time")


if __name__ == "__main__":
    main()
