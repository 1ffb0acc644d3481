"""Refinement settings, measured on a trained run: optimiser, step size, weighting, regulariser.

    python benchmarks/refinement.py runs/polygons --n 64
    python benchmarks/refinement.py runs/polygons --only full-adam-0.01 code-a0-b1 --steps 200

Each variant refines the same G outputs of n seeded test images: `full` towards their full
S_J x (reconstruction), `code` towards their codes alone (what sampling has). It prints the
PSNR of the refined images against the true images after 0, 25, 50, 100, ... gradient
evaluations, the SSIM and code cycle error ‖L S_J x − z‖/‖z‖ at the end, and the seconds per
64 images on this machine, with its CPU. Strips (original, G, refined) go to --out.
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
from scatgen.evaluation import cpu_or_gpu_name  # noqa: E402
from scatgen.metrics import psnr, ssim  # noqa: E402
from scatgen.pictures import enlarge, grid, save_png, to_unit  # noqa: E402
from scatgen.refinement import code_objective, descend, image_objective  # noqa: E402

VARIANTS = {
    "full-adam-0.01": ("full", dict(optimizer="adam", lr=0.01)),
    "full-adam-0.05": ("full", dict(optimizer="adam", lr=0.05)),
    "full-lbfgs": ("full", dict(optimizer="lbfgs")),
    "code-adam-a0-b0": ("code", dict(optimizer="adam", lr=0.01, weighting=0.0, anchor=0.0)),
    "code-adam-a0-b1": ("code", dict(optimizer="adam", lr=0.01, weighting=0.0, anchor=1.0)),
    "code-lbfgs-a0-b0": ("code", dict(optimizer="lbfgs", weighting=0.0, anchor=0.0)),
    "code-lbfgs-a0-b0.1": ("code", dict(optimizer="lbfgs", weighting=0.0, anchor=0.1)),
    "code-lbfgs-a0-b1": ("code", dict(optimizer="lbfgs", weighting=0.0, anchor=1.0)),
    "code-lbfgs-a0-b10": ("code", dict(optimizer="lbfgs", weighting=0.0, anchor=10.0)),
    "code-lbfgs-a0.5-b1": ("code", dict(optimizer="lbfgs", weighting=0.5, anchor=1.0)),
    "code-lbfgs-a1-b1": ("code", dict(optimizer="lbfgs", weighting=1.0, anchor=1.0)),
    "code-lbfgs-a0-b1-tv0.001": ("code", dict(optimizer="lbfgs", weighting=0.0, anchor=1.0, tv=0.001)),
    "code-lbfgs-a0-b1-tv0.0001": ("code", dict(optimizer="lbfgs", weighting=0.0, anchor=1.0, tv=0.0001)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=64, help="test images (one batch)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS))
    parser.add_argument("--out", default="runs/benchmarks/refinement")
    args = parser.parse_args()

    pipe = scatgen.load(args.run)
    test = load_split(pipe, "test", limit=args.n, seed=0)
    images = torch.stack([test[i] for i in range(len(test))])
    codes = pipe.encode(images)
    start = pipe.decode(codes, refine=0)
    scattering, whitening = pipe.scattering, pipe.whitening
    with torch.no_grad():
        target = scattering(images).reshape(len(images), -1)
        start_coeffs = scattering(start).reshape(len(images), -1)
    checkpoints = [c for c in (25, 50, 100, 200, 400) if c <= args.steps]
    out = Path(args.out)
    print(f"run {args.run}, {len(images)} test images, {cpu_or_gpu_name(pipe.device)}")
    print(f"G alone: PSNR {psnr(to_unit(start), to_unit(images)).mean():.2f} dB, "
          f"SSIM {ssim(to_unit(start), to_unit(images)).mean():.4f}")
    header = ["variant", "target"] + [f"PSNR@{c}" for c in checkpoints] + ["SSIM", "cycle err", "s / 64 img"]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for name in args.only or VARIANTS:
        mode, changes = VARIANTS[name]
        cfg = replace(pipe.cfg.refine, steps=args.steps, **changes)
        if mode == "full":
            objective = image_objective(target)
        else:
            objective = code_objective(whitening, codes, start_coeffs, cfg.weighting, cfg.anchor)
        trace: dict[int, float] = {}
        timed = [0.0]

        def on_step(i: int, x: torch.Tensor) -> None:
            if i in checkpoints:
                tic = time.perf_counter()
                trace[i] = psnr(to_unit(x), to_unit(images)).mean().item()
                timed[0] += time.perf_counter() - tic

        tic = time.perf_counter()
        refined = descend(scattering, start, objective, cfg, on_step=on_step)
        seconds = time.perf_counter() - tic - timed[0]
        cycle = ((pipe.encode(refined) - codes).norm(dim=1) / codes.norm(dim=1)).mean().item()
        row = [name, mode] + [f"{trace.get(c, float('nan')):.2f}" for c in checkpoints]
        row += [f"{ssim(to_unit(refined), to_unit(images)).mean():.4f}", f"{cycle:.3f}",
                f"{seconds * 64 / len(images):.1f}"]
        print("| " + " | ".join(row) + " |", flush=True)
        strip = torch.cat([images[:8], start[:8], refined[:8]])
        save_png(enlarge(grid(strip, nrow=8), 4), out / f"{name}.png")
    print(f"strips (original, G, refined) in {out}/")


if __name__ == "__main__":
    main()
