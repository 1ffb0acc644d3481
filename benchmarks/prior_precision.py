"""The prior's fit in float32 against bf16 autocast (`prior.mixed_precision`), interleaved.

    python benchmarks/prior_precision.py                      # the polygons config's latent_flow, random codes
    python benchmarks/prior_precision.py --run runs/polygons  # the run's codes, + the error at equal steps

Each round fits the config's latent_flow for --steps autoencoder and --steps flow steps (the clock
off), once in each precision, alternating, so that a slow spell of a shared VM hits both. Prints
the milliseconds per step of each (median over the rounds, spread (max − min) / median, flagged
above 20%) and the ratio. A step's time is the whole fit's over its steps, so the fit's fixed costs
(such as encoding the codes to latents, in float32) are in both and narrow the ratio a little. The
ratio is what `prior.mixed_precision=auto` weighs at the start of a fit on the clock.
With --run it fits on the run's train codes and then, once per precision, fits --equal-steps
steps of each stage and prints the autoencoder's relative error on the run's test codes, so that a
faster step is seen to buy the same fit.
"""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scatgen  # noqa: E402
from scatgen.config import load_config  # noqa: E402
from scatgen.data import load_split  # noqa: E402
from scatgen.evaluation import _stack, cpu_or_gpu_name  # noqa: E402
from scatgen.prior import fit_latent_flow  # noqa: E402

PRECISIONS = {"float32": "no", "bf16 autocast": "bf16"}


def relative_error(prior, codes: torch.Tensor) -> float:
    """Mean ‖D(E(z)) − z‖ / ‖z‖ of the prior's autoencoder over codes (n, d)."""
    with torch.no_grad():
        back = prior.state_to_codes(prior.codes_to_state(codes))
    return ((back - codes).norm(dim=1) / codes.norm(dim=1)).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "polygons.yaml"))
    parser.add_argument("--run", help="a trained run: fit on its codes and report the error at equal steps")
    parser.add_argument("--steps", type=int, default=60, help="steps of each stage per timed fit")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--equal-steps", type=int, default=1500, help="steps of each stage for the error check")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.run:
        pipe = scatgen.load(args.run)
        cfg, eigenvalues = pipe.cfg.prior, pipe.whitening.eigenvalues.cpu()
        train = pipe.encode(_stack(load_split(pipe, "train"), 128))
        test = pipe.encode(_stack(load_split(pipe, "test"), 128))
    else:
        config = load_config(args.config)
        cfg, eigenvalues = config.prior, None
        generator = torch.Generator().manual_seed(0)
        train = torch.randn(10_000, config.whitening.d, generator=generator)
        cfg = replace(cfg, code_weighting=0.0)  # no eigenvalues without a run
        test = None
    cfg = replace(cfg, kind="latent_flow", max_minutes=0.0)
    print(f"{cpu_or_gpu_name(torch.device('cpu'))}; latent_flow d={train.shape[1]}, latent {cfg.latent}, "
          f"width {cfg.width}, depth {cfg.depth}, batch {cfg.batch_size}; {len(train)} train codes"
          + (f" of {args.run}" if args.run else " (random)"))

    def fit(mode: str, steps: int):
        tic = time.perf_counter()
        prior = fit_latent_flow(train, replace(cfg, mixed_precision=mode, autoencoder_steps=steps, fit_steps=steps),
                                seed=0, eigenvalues=eigenvalues)
        return prior, time.perf_counter() - tic

    for mode in PRECISIONS.values():  # warm-up: oneDNN picks its kernels on a precision's first call
        fit(mode, 5)
    seconds: dict[str, list[float]] = {name: [] for name in PRECISIONS}
    for _ in range(args.rounds):
        for name, mode in PRECISIONS.items():
            seconds[name].append(fit(mode, args.steps)[1] / args.steps * 1e3)  # ms per autoencoder + flow step

    print("\n| precision | ms per autoencoder + flow step | spread | speed-up |")
    print("| --- | --- | --- | --- |")
    medians = {name: sorted(times)[len(times) // 2] for name, times in seconds.items()}
    for name, times in seconds.items():
        spread = (max(times) - min(times)) / medians[name]
        print(f"| {name} | {medians[name]:.1f} | {spread:.0%}{'!' if spread > 0.2 else ''} | "
              f"{medians['float32'] / medians[name]:.2f}x |")

    if test is not None:
        print(f"\n| precision | fit of {args.equal_steps} + {args.equal_steps} steps (s) | "
              f"autoencoder error, test codes | train codes |")
        print("| --- | --- | --- | --- |")
        for name, mode in PRECISIONS.items():
            prior, s = fit(mode, args.equal_steps)
            print(f"| {name} | {s:.0f} | {relative_error(prior, test):.3f} | {relative_error(prior, train[:1000]):.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
