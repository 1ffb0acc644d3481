"""Time to quality on polygons: the default generator against the original-GSN configuration.

For each image size and each config, train for a fixed wall-clock budget (encoding excluded;
codes are cached first) and report training images/s, test PSNR at the end of the budget, and
the training time each config needs to reach the original GSN's final PSNR.

    python benchmarks/time_to_quality.py                      # 32² and 64², 10 minutes each
    python benchmarks/time_to_quality.py --sizes 32 --minutes 3
    python benchmarks/time_to_quality.py --device cuda --sizes 64 128
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scatgen.config import load_config  # noqa: E402
from scatgen.training import Trainer  # noqa: E402

CONFIGS = {"default": "configs/polygons.yaml", "gsn-original": "configs/polygons-gsn-original.yaml"}
SIZE_OVERRIDES = {  # the default config is 32²; larger sizes use J=4 and wider generators
    32: {},
    64: {"data.image_size": "64", "encoder.J": "4"},
    128: {"data.image_size": "128", "encoder.J": "4"},
}
GSN_ORIGINAL_CHANNELS = {32: 256, 64: 512, 128: 1024}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return f"{model}, {torch.get_num_threads()} threads"


def time_to_reach(history: list[dict], target: float) -> float | None:
    for point in history:
        if point["test_psnr"] >= target:
            return point["train_seconds"]
    return None


def run(name: str, size: int, minutes: float, out: Path, eval_every: int, extra: dict, same_codes: bool) -> dict:
    overrides = dict(SIZE_OVERRIDES[size], **{
        "train.max_minutes": str(minutes), "train.max_steps": "1000000", "train.eval_every": str(eval_every),
        "train.checkpoint_every": "1000000", "run.out_dir": str(out / f"{name}-{size}"),
        "data.num_train": "10000", "data.num_test": "1000",
    }, **extra)
    if name == "gsn-original":
        overrides["generator.channels"] = str(GSN_ORIGINAL_CHANNELS[size])
        if same_codes:  # only the generator and optimiser differ; saves a J=4 encoding
            overrides["encoder.J"] = SIZE_OVERRIDES[size].get("encoder.J", "3")
    cfg = load_config(ROOT / CONFIGS[name], overrides)
    trainer = Trainer(cfg, progress=False)  # encodes (or hits the cache) before the clock starts
    metrics = trainer.train()
    params = sum(p.numel() for p in trainer.accelerator.unwrap_model(trainer.model).parameters())
    steps = metrics["steps"]
    return {"config": name, "size": size, "params": params, "steps": steps,
            "images_per_s": steps * cfg.train.batch_size / (metrics["train_minutes"] * 60),
            "final_psnr": metrics["test/psnr"], "history": metrics["history"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--out", default="runs/benchmarks/time_to_quality")
    parser.add_argument("--same-codes", action="store_true",
                        help="train the gsn-original generator on the default config's codes (same J)")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides key=value for both configs")
    args = parser.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.set)
    out = Path(args.out)
    results = []
    for size in args.sizes:
        for name in CONFIGS:
            results.append(run(name, size, args.minutes, out, args.eval_every, extra, args.same_codes))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "history"}), flush=True)
    codes = "the same codes for both" if args.same_codes else "each config's own J"
    print(f"\nmachine: {machine()}; budget {args.minutes:g} min of training per run (encoding excluded); {codes}\n")
    print("| size | config | params | images/s | test PSNR at budget | time to reach gsn-original's PSNR |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        rows = [r for r in results if r["size"] == size]
        target = next(r["final_psnr"] for r in rows if r["config"] == "gsn-original")
        for r in rows:
            t = time_to_reach(r["history"], target)
            reach = f"{t / 60:.1f} min" if t is not None else "not reached"
            print(f"| {size}² | {r['config']} | {r['params'] / 1e6:.2f} M | {r['images_per_s']:.0f} | "
                  f"{r['final_psnr']:.2f} dB | {reach} |")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
