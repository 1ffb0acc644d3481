"""Code priors and refinement on a trained run: fit every prior kind, then evaluate them all.

    python benchmarks/priors.py runs/polygons --num-fid 1000
    python benchmarks/priors.py runs/polygons --num-fid 300 --kinds gmm flow --refine 25

Fits each prior in --kinds on the run's train codes (timed) and stores it in the run's bundle,
then runs the evaluation protocol with every prior: FID, KID, precision and recall against the
test split for G alone and refined, for samples and for test reconstructions, and the
memorisation check. Writes RUN/evaluation.json and evaluation.md, and prints the table with
the fit times and the machine.
"""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scatgen  # noqa: E402
from scatgen.bundle import add_prior, find_bundle  # noqa: E402
from scatgen.codes import encode_split  # noqa: E402
from scatgen.evaluation import cpu_or_gpu_name, evaluate, markdown_table, write_report  # noqa: E402
from scatgen.prior import fit_prior  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--kinds", nargs="+", default=["gmm", "flow"], choices=["gmm", "flow"])
    parser.add_argument("--num-fid", type=int, default=1000)
    parser.add_argument("--refine", type=int, default=None, help="refinement steps (default: the bundle's)")
    parser.add_argument("--inception", help="TorchScript FID Inception weights (default: the metrics extra's)")
    parser.add_argument("--refit", action="store_true", help="refit priors the bundle already holds")
    args = parser.parse_args()

    pipe = scatgen.load(args.run)
    codes = encode_split(pipe.cfg, "train", pipe.scattering, pipe.whitening, pipe.device).codes
    fit_seconds = {}
    for kind in args.kinds:
        if kind in pipe.priors and not args.refit:
            print(f"{kind}: kept the bundle's prior (--refit to fit it again)")
            continue
        tic = time.perf_counter()
        prior = fit_prior(codes, replace(pipe.cfg.prior, kind=kind), seed=pipe.cfg.run.seed, progress=True)
        fit_seconds[kind] = time.perf_counter() - tic
        add_prior(args.run, prior)
    pipe = scatgen.load(args.run)
    report = evaluate(pipe, num_fid=args.num_fid, inception=args.inception, refine=args.refine,
                      priors=["normal", *args.kinds])
    report["prior_fit_seconds"] = fit_seconds
    write_report(report, find_bundle(args.run).parent)
    print(f"machine: {cpu_or_gpu_name(pipe.device)}; {len(codes)} train codes, d={pipe.d}, "
          f"prior.dims={pipe.cfg.prior.dims}")
    for kind, seconds in fit_seconds.items():
        print(f"fit {kind}: {seconds:.0f} s")
    print(markdown_table(report))


if __name__ == "__main__":
    main()
