"""Choose the default GSN architecture by measurement: test PSNR after a fixed CPU budget.

Every candidate trains on the same cached codes of configs/polygons.yaml for the same
wall-clock budget (its learning rate decays over that budget); the script prints a table
sorted by test PSNR.

    python benchmarks/architecture_sweep.py --minutes 3
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scatgen.config import load_config  # noqa: E402
from scatgen.training import Trainer  # noqa: E402

CANDIDATES = {
    "k3-nearest-256": {"generator.kernel_size": "3", "generator.upsample": "nearest", "generator.channels": "256"},
    "k3-bilinear-256": {"generator.kernel_size": "3", "generator.upsample": "bilinear", "generator.channels": "256"},
    "k3-nearest-128": {"generator.kernel_size": "3", "generator.upsample": "nearest", "generator.channels": "128"},
    "k3-nearest-64": {"generator.kernel_size": "3", "generator.upsample": "nearest", "generator.channels": "64",
                      "generator.min_channels": "16"},
    # training recipes around the default architecture
    "k3-nearest-64-l2": {"generator.channels": "64", "generator.min_channels": "16", "train.loss": "l2"},
    "k3-nearest-64-b128": {"generator.channels": "64", "generator.min_channels": "16", "train.batch_size": "128",
                           "train.lr": "3e-3"},
    "k3-nearest-96": {"generator.channels": "96", "generator.min_channels": "16"},
    "k5-nearest-128": {"generator.kernel_size": "5", "generator.upsample": "nearest", "generator.channels": "128"},
    "k3-transposed-256": {"generator.kernel_size": "3", "generator.upsample": "transposed", "generator.channels": "256"},
    "k7-bilinear-256": {"generator.kernel_size": "7", "generator.upsample": "bilinear", "generator.channels": "256"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--only", nargs="*", help="candidate names")
    parser.add_argument("--out", default="runs/benchmarks/architecture_sweep")
    args = parser.parse_args()
    rows = []
    for name, overrides in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        cfg = load_config(ROOT / "configs/polygons.yaml", dict(overrides, **{
            "train.max_minutes": str(args.minutes), "train.max_steps": "1000000", "train.eval_every": "1000000",
            "train.checkpoint_every": "1000000", "run.out_dir": f"{args.out}/{name}"}))
        trainer = Trainer(cfg, progress=False)
        metrics = trainer.train()
        params = sum(p.numel() for p in trainer.accelerator.unwrap_model(trainer.model).parameters())
        rows.append({"name": name, "params": params, "steps": metrics["steps"], "psnr": metrics["test/psnr"],
                     "images_per_s": metrics["steps"] * cfg.train.batch_size / (60 * metrics["train_minutes"])})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| candidate | params | steps in {args.minutes:g} min | images/s | test PSNR |\n| --- | --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: -r["psnr"]):
        print(f"| {r['name']} | {r['params'] / 1e6:.2f} M | {r['steps']} | {r['images_per_s']:.0f} | {r['psnr']:.2f} dB |")


if __name__ == "__main__":
    main()
