"""Whitening fit cost: time and peak RSS against the number of images, and encoding throughput.

Each configuration runs in a fresh process on polygons (so peak RSS is its own), with an
empty cache, the default streamed fit (train coeffs spilled to disk between passes) and
the fast scattering backend. Peak RSS must stay flat in N.

    python benchmarks/whitening.py                      # the three figures from the foundation issue
    python benchmarks/whitening.py --quick              # 64², N=500 and 2000
"""

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = [(64, 4, 256, 2000), (64, 4, 256, 8000), (128, 4, 512, 2000)]


def worker(size: int, J: int, d: int, n: int, spill_gb: float) -> dict:
    import torch

    from scatgen.codes import encode_split
    from scatgen.coefficients import CoeffSpill, spill_fits
    from scatgen.encoder import fit_encoder
    from scatgen.config import load_config
    from scatgen.scattering import Scattering

    with tempfile.TemporaryDirectory() as cache:
        cfg = load_config(None, {"data.image_size": str(size), "data.num_train": str(n), "data.num_test": "256",
                                 "encoder.J": str(J), "whitening.d": str(d), "run.cache_dir": cache,
                                 "whitening.spill_gb": str(spill_gb)})
        scattering = Scattering(J, size, 8, "fast", cache_dir=ROOT / ".cache/scatgen")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        spill = CoeffSpill(cache) if spill_fits(cfg, scattering, n) else None
        start = time.time()
        encoder = fit_encoder(cfg, "cpu", progress=False, spill=spill, scattering=scattering)
        whitening = encoder.whitening
        fit_s = time.time() - start
        if spill is not None:
            spill.close()
        start = time.time()
        codes = encode_split(cfg, "test", encoder, progress=False)
        encode_rate = len(codes.codes) / (time.time() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"size": size, "J": J, "d": d, "N": n, "D": whitening.D, "method": whitening.metadata["method"],
            "spill": spill is not None, "fit_s": fit_s, "peak_rss_mib": peak, "rss_before_fit_mib": rss_before,
            "encode_images_per_s": encode_rate, "torch_threads": torch.get_num_threads()}


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    import os

    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--spill-gb", type=float, default=8.0, help="0 = scatter again on every pass")
    parser.add_argument("--worker", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, spill_gb=args.spill_gb)))
        return
    cases = [(64, 4, 256, 500), (64, 4, 256, 2000)] if args.quick else CASES
    rows = []
    for case in cases:
        out = subprocess.run([sys.executable, __file__, "--worker", *map(str, case), "--spill-gb", str(args.spill_gb)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nmachine: {machine()}\n")
    print("| size | J | d | N | D | method | spill | fit time | peak RSS | encoding |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['size']}² | {r['J']} | {r['d']} | {r['N']} | {r['D']} | {r['method']} | {r['spill']} | "
              f"{r['fit_s']:.0f} s | {r['peak_rss_mib']:.0f} MiB | {r['encode_images_per_s']:.0f} img/s |")


if __name__ == "__main__":
    main()
