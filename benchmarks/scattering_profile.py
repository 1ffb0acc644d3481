"""Where the fast scattering backend spends its CPU time: a torch.profiler breakdown by op.

    python benchmarks/scattering_profile.py                 # 64², J=4, L=8, batch 64
    python benchmarks/scattering_profile.py --size 128 --batch 16 --threads 1

Prints the top ops by self CPU time and the share taken by FFTs, by elementwise complex
work (the filter products, modulus, padding) and by matrix products (separable low-pass),
which says whether the forward is bound by FFT time or by memory traffic.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scatgen.scattering import FastScattering2D  # noqa: E402

GROUPS = {"fft": ("fft",), "matmul": ("mm", "matmul", "bmm", "addmm", "einsum")}


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(k in name for k in keys):
            return group
    return "elementwise / copies"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--J", type=int, default=4)
    parser.add_argument("--L", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    module = FastScattering2D(args.J, (args.size, args.size), args.L, cache_dir=ROOT / ".cache/scatgen")
    x = torch.rand(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        module(x)  # warm-up
        start = time.perf_counter()
        module(x)
        plain = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            module(x)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    print(f"N={args.size}, B={args.batch}, J={args.J}, L={args.L}, torch threads {torch.get_num_threads()}: "
          f"{args.batch / plain:.1f} img/s unprofiled\n")
    print("| op | self CPU | share | calls |\n| --- | --- | --- | --- |")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e3:.1f} ms | {e.self_cpu_time_total / total:.0%} | {e.count} |")
    shares: dict[str, float] = {}
    for e in events:
        shares[group_of(e.key)] = shares.get(group_of(e.key), 0.0) + e.self_cpu_time_total / total
    print("\n" + ", ".join(f"{g}: {s:.0%}" for g, s in sorted(shares.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
