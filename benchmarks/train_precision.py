"""G's training in float32 against `train.mixed_precision=auto` (bf16 where it times faster), at equal time.

    python benchmarks/train_precision.py                   # the default's 5.5 minutes, 2 rounds
    python benchmarks/train_precision.py --minutes 1 --rounds 1

Each measurement is a fresh `python train.py configs/polygons.yaml` process that trains G alone
for --minutes of training time (no prior, no refinement; evaluation and checkpoints as the config
sets them, outside the clock). The two settings alternate in ABBA order within each round, so
that a VM that changes speed hurts both alike. Prints, per run, the steps G took, the test PSNR of
G alone at the end and what `auto` chose; then the means, and auto's steps and PSNR against
float32's. Run it with nothing else busy: one other process on a 2-core machine slows training
about 10×.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {"float32": "no", "auto": "auto"}
G_ONLY = ["--prior.kind=normal", "--refine.steps=0", "--run.max_minutes=0"]


def train(setting: str, minutes: float, work: Path, cache: Path, extra: list[str]) -> dict:
    out = work / f"run-{setting}"
    cmd = [sys.executable, "train.py", "configs/polygons.yaml", *G_ONLY, f"--train.max_minutes={minutes}",
           f"--train.mixed_precision={SETTINGS[setting]}", f"--run.out_dir={out}", f"--run.cache_dir={cache}",
           "--run.overwrite=true", *extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"steps": metrics["steps"], "psnr": metrics["test/psnr"], "minutes": metrics["train_minutes"],
            "precision": metrics.get("train_precision", "float32")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.5, help="G's training time per run (the default's)")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds: 4 runs each")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides key=value for every run")
    args = parser.parse_args()
    import torch

    from scatgen.evaluation import cpu_or_gpu_name

    print(f"machine: {cpu_or_gpu_name(torch.device('cpu'))}, usable cores {len(os.sched_getaffinity(0))}; "
          f"G alone for {args.minutes:g} min of training per run", flush=True)
    work = Path(tempfile.mkdtemp(prefix="scatgen-train-precision-"))
    extra = [f"--{kv}" for kv in args.set]
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    try:
        train("float32", 0.05, work, work / "cache", extra)  # untimed: fills the code and image caches
        print("\n| run | setting | steps | steps/s | test PSNR, G alone (dB) | auto's choice |")
        print("| --- | --- | --- | --- | --- | --- |")
        order = [name for _ in range(args.rounds) for name in ("float32", "auto", "auto", "float32")]
        for i, name in enumerate(order, 1):
            r = train(name, args.minutes, work, work / "cache", extra)
            runs[name].append(r)
            print(f"| {i} | {name} | {r['steps']:,} | {r['steps'] / (60 * r['minutes']):.1f} | {r['psnr']:.2f} | "
                  f"{r['precision'] if name == 'auto' else '-'} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mean = {name: {k: statistics.mean(r[k] for r in rs) for k in ("steps", "psnr")} for name, rs in runs.items()}
    spread = {name: (max(r["steps"] for r in rs) - min(r["steps"] for r in rs)) / mean[name]["steps"]
              for name, rs in runs.items()}
    print("\n| setting | mean steps | steps spread | mean test PSNR (dB) | steps vs float32 | PSNR vs float32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in SETTINGS:
        flag = " (above 20%: a shared VM?)" if spread[name] > 0.2 else ""
        print(f"| {name} | {mean[name]['steps']:,.0f} | {100 * spread[name]:.0f}%{flag} | {mean[name]['psnr']:.2f} | "
              f"{mean[name]['steps'] / mean['float32']['steps']:.2f}x | "
              f"{mean[name]['psnr'] - mean['float32']['psnr']:+.2f} dB |")


if __name__ == "__main__":
    main()
