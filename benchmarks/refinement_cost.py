"""Where refinement's time goes, on a trained run, and how many evaluations reach a PSNR: the
scattering's forward and backward against the whole L-BFGS refinement, for each refine.balance,
step count and batch size, with the PSNR each reaches.

    python benchmarks/refinement_cost.py runs/polygons --steps 15 20 25 30 40 50 --codes
    python benchmarks/refinement_cost.py runs/polygons --batch-sizes 32 64 128 --balances 0.5

Refines the G outputs of the first n test images towards their full S_J x (as `reconstruct`
does); the balances run interleaved at each step count. Prints, with the CPU and torch's thread
count: the seconds per image of one forward and backward of S_J alone (batch 64), a row per
(balance, batch, steps) with the mean test PSNR and seconds per image, and, for each balance,
the evaluations and seconds that reach --bar dB (interpolated between the step counts) with
their ratio to the first balance's. --codes adds rows for the test codes refined with the code
objective (G(z) → L S_J x = z), which balance does not touch."""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scatgen  # noqa: E402
from scatgen.data import load_split  # noqa: E402
from scatgen.evaluation import _stack, _timed as timed, cpu_or_gpu_name  # noqa: E402
from scatgen.metrics import psnr  # noqa: E402
from scatgen.pictures import to_unit  # noqa: E402
from scatgen.refinement import refine_decodings, refine_reconstructions  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=128, help="test images")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--steps", type=int, nargs="+", default=[50], help="gradient evaluations")
    parser.add_argument("--balances", type=float, nargs="+", default=[0.0, 0.5],
                        help="refine.balance values (0 = the plain ‖S_J x − S_J x_t‖²)")
    parser.add_argument("--bar", type=float, default=34.0, help="PSNR at which to compare the balances")
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
    print("| target | balance | batch | steps | refined PSNR (dB) | s / image | of which S_J f+b (steps × per image) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    curves: dict[float, list[tuple[int, float, float]]] = {b: [] for b in args.balances}
    for steps in args.steps:
        for batch in args.batch_sizes:
            # Balances interleaved at each step count, so that a slow spell of the VM hits all of them.
            for balance in args.balances:
                cfg = replace(pipe.cfg.refine, steps=steps, batch_size=batch, balance=balance)
                refined, seconds = timed(refine_reconstructions, scattering, start, images, cfg)
                seconds /= len(images)
                db = psnr(to_unit(refined), to_unit(images)).mean().item()
                if batch == args.batch_sizes[0]:
                    curves[balance].append((steps, db, seconds))
                print(f"| S_J x | {balance:g} | {batch} | {steps} | {db:.2f} | {seconds:.3f} | "
                      f"{steps * per_call / seconds:.0%} |", flush=True)
            if args.codes:
                cfg = replace(pipe.cfg.refine, steps=steps, batch_size=batch)
                refined, seconds = timed(refine_decodings, pipe.encoder, start, codes, cfg)
                seconds /= len(images)
                print(f"| code | – | {batch} | {steps} | {psnr(to_unit(refined), to_unit(images)).mean():.2f} | "
                      f"{seconds:.3f} | {steps * per_call / seconds:.0%} |", flush=True)
    print(f"\nto reach {args.bar:g} dB on test reconstructions (batch {args.batch_sizes[0]}, interpolated):")
    reached = {b: crossing(points, args.bar) for b, points in curves.items()}
    for balance, hit in reached.items():
        print(f"  balance {balance:g}: " + ("not reached in the steps measured" if hit is None
                                            else f"{hit[0]:.1f} evaluations, {hit[1]:.3f} s / image"))
    reference = reached.get(args.balances[0])
    for balance, hit in list(reached.items())[1:]:
        if reference and hit:
            print(f"  balance {balance:g} against {args.balances[0]:g}: {reference[0] / hit[0]:.2f}x fewer evaluations, "
                  f"{reference[1] / hit[1]:.2f}x less time")


if __name__ == "__main__":
    main()
