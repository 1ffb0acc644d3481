"""How exact must a sampled code be? Test codes, perturbed, decoded and refined, judged by Inception.

    python benchmarks/code_tolerance.py runs/polygons --n 200

A prior's samples are refined towards their own codes, like the ceiling row of priors.py. This
script measures how fast the ceiling falls when the codes are wrong by a known amount: Gaussian
noise on every whitened component, on the leading 64 only, or on the trailing d − 64, and the
leading 64 exact with the rest unknown (refined towards those 64 only). Prints precision and
recall (k=3) against the same N test images, and the machine.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scatgen  # noqa: E402
from scatgen.data import load_split  # noqa: E402
from scatgen.evaluation import _stack, cpu_or_gpu_name  # noqa: E402
from scatgen.inception import compute_features, load_inception  # noqa: E402
from scatgen.metrics import precision_recall  # noqa: E402
from scatgen.pictures import to_unit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--lead", type=int, default=64, help="leading components of the split")
    args = parser.parse_args()

    pipe = scatgen.load(args.run)
    net = load_inception()
    real = _stack(load_split(pipe, "test"), 128)[:args.n]
    codes = pipe.encode(real)
    real_feats = compute_features(net, to_unit(real))
    g = torch.Generator().manual_seed(0)
    k = args.lead

    def noisy(sigma: float, part: slice) -> torch.Tensor:
        z = codes.clone()
        z[:, part] += sigma * torch.randn(z[:, part].shape, generator=g)
        return z

    leading_only = codes.clone()
    leading_only[:, k:] = 0
    variants = [
        ("test codes (the ceiling)", codes, None),
        ("noise 0.1 on every component", noisy(0.1, slice(None)), None),
        ("noise 0.3 on every component", noisy(0.3, slice(None)), None),
        (f"noise 0.3 on the leading {k}", noisy(0.3, slice(0, k)), None),
        (f"noise 0.5 on the trailing {pipe.d - k}", noisy(0.5, slice(k, None)), None),
        (f"leading {k} exact, the rest 0, refined towards the {k}", leading_only, k),
    ]
    print(f"| codes, decoded and refined ({pipe.refine_settings().steps} steps) | precision | recall | s |")
    print("| --- | --- | --- | --- |")
    for name, z, dims in variants:
        tic = time.perf_counter()
        images = pipe.decode(z, dims=dims)
        scores = precision_recall(real_feats, compute_features(net, to_unit(images)), k=3)
        print(f"| {name} | {scores['precision']:.3f} | {scores['recall']:.3f} | {time.perf_counter() - tic:.0f} |",
              flush=True)
    print(f"\nmachine: {cpu_or_gpu_name(pipe.device)}; N={len(real)}; Inception k=3")


if __name__ == "__main__":
    main()
