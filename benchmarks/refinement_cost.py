"""Where refinement's time goes, on a trained run: the scattering's forward and backward against
the whole L-BFGS refinement, at several refinement batch sizes, with the PSNR each reaches.

    python benchmarks/refinement_cost.py runs/polygons --n 128
    python benchmarks/refinement_cost.py runs/polygons --n 128 --batch-sizes 64 --steps 25 50

Refines the G outputs of the first n test images towards their full S_J x (as `reconstruct`
does). Prints, with the CPU and torch's thread count: the seconds per image of `steps` forward
and backward passes of S_J alone (at batch 64), and for each (batch size, steps) the seconds per
image of the whole refinement and the mean test PSNR it reaches. Each image has its own line
search, yet the PSNR moved with the batch size when this was first run (benchmarks/README.md).
"""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scatgen  # noqa: E402
from scatgen.data import load_split  # noqa: E402
from scatgen.evaluation import _stack, cpu_or_gpu_name  # noqa: E402
from scatgen.metrics import psnr  # noqa: E402
from scatgen.pictures import to_unit  # noqa: E402
from scatgen.refinement import refine_reconstructions  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=128, help="test images")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--steps", type=int, nargs="+", default=[50], help="gradient evaluations")
    args = parser.parse_args()

    pipe = scatgen.load(args.run)
    images = _stack(load_split(pipe, "test"), 128)[:args.n]
    start = pipe.decode(pipe.encode(images), refine=0)
    scattering = pipe.scattering
    print(f"run {args.run}, {len(images)} test images, {cpu_or_gpu_name(pipe.device)}")
    per_call = scattering_seconds(scattering, start[:64]) / len(start[:64])
    print(f"G alone: {psnr(to_unit(start), to_unit(images)).mean():.2f} dB; S_J forward + backward: "
          f"{per_call * 1000:.2f} ms per image\n")
    print("| batch | steps | refined PSNR (dB) | s / image | of which S_J f+b (steps × per image) |")
    print("| --- | --- | --- | --- | --- |")
    for steps in args.steps:
        for batch in args.batch_sizes:
            cfg = replace(pipe.cfg.refine, steps=steps, batch_size=batch)
            tic = time.perf_counter()
            refined = refine_reconstructions(scattering, start, images, cfg)
            seconds = (time.perf_counter() - tic) / len(images)
            print(f"| {batch} | {steps} | {psnr(to_unit(refined), to_unit(images)).mean():.2f} | {seconds:.3f} | "
                  f"{steps * per_call / seconds:.0%} |", flush=True)


if __name__ == "__main__":
    main()
