"""Training throughput of the default config: a reference commit against this tree, and variants.

    python benchmarks/train_throughput.py                       # ref = the commit before issue 14's work
    python benchmarks/train_throughput.py --ref HEAD~3 --short 40 --long 240 --repeats 2
    python benchmarks/train_throughput.py --profile-only        # where a step's time goes, this tree

Every measurement is a fresh `python train.py configs/polygons.yaml` process (no evaluation,
checkpoint, prior fit or refinement inside the timed loop), and the variants alternate
within each repeat, so a machine that changes speed mid-run hurts every variant alike.
Steady-state steps/s comes from two runs of different lengths, (long − short) / (t_long −
t_short), which cancels fixed costs; the first-call cost (compilation, warm-up) is what the
short run spent beyond its steps at the steady rate. The reference commit is checked out in
a temporary git worktree. Run it with nothing else busy: one other process on a 2-core
machine slows training about 10×.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REF = "b93747c"  # main before issue 14: renders polygons every step, reads the loss every step
TIMED = ["--train.max_minutes=0", "--train.eval_every=1000000", "--train.checkpoint_every=1000000",
         "--prior.kind=normal", "--refine.steps=0"]
VARIANTS = {  # name: (tree, overrides[, environment])
    "before (ref)": ("ref", []),
    "after, images rendered": ("this", ["--data.cache_images=false"]),
    "after": ("this", []),
    "after + compiled generator": ("this", ["--train.compile=true"]),
    "after, bf16 autocast": ("this", ["--train.mixed_precision=bf16"]),  # auto keeps float32 in a run without a clock
    # OMP_NUM_THREADS set: train.py leaves the thread count alone (scatgen.speed.govern_threads)
    "after, thread governor off": ("this", [], {"OMP_NUM_THREADS": "2"}),
}


def train_seconds(tree: Path, steps: int, overrides: list[str], work: Path, cache: Path,
                  env: dict[str, str] | None = None) -> float:
    out = work / f"run-{time.time_ns()}"
    cmd = [sys.executable, "train.py", "configs/polygons.yaml", f"--train.max_steps={steps}", *TIMED, *overrides,
           f"--run.out_dir={out}", f"--run.cache_dir={cache}"]
    result = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    assert metrics["steps"] == steps, metrics["steps"]
    return metrics["train_minutes"] * 60


def profile(steps: int = 200) -> dict[str, float]:
    """Seconds per step in data loading, forward, backward, optimiser and the loss read-back, this tree."""
    import torch
    from scatgen.config import load_config
    from scatgen.data.batches import CodedImages, StepBatches
    from scatgen.training import Trainer
    from scatgen.data import collate_skip_none
    from torch.utils.data import DataLoader

    results = {}
    for cache_images in (False, True):
        work = Path(tempfile.mkdtemp(prefix="scatgen-profile-"))
        cfg = load_config(ROOT / "configs/polygons.yaml", {
            "run.out_dir": str(work / "run"), "run.cache_dir": str(ROOT / ".cache/scatgen"),
            "data.cache_images": str(cache_images)})
        trainer = Trainer(cfg, progress=False)
        t = cfg.train
        dataset = CodedImages(trainer.train_images, trainer.codesets["train"])
        loader = DataLoader(dataset, batch_sampler=StepBatches(len(dataset), t.batch_size, 0, 0, steps, 0, 1),
                            collate_fn=collate_skip_none)
        model, opt = trainer.model, trainer.optimizer
        model.train()
        parts = dict(data=0.0, forward=0.0, backward=0.0, optimiser=0.0, sync=0.0)
        tic = time.perf_counter()
        for i, (codes, images) in enumerate(loader):
            now = time.perf_counter(); parts["data"] += now - tic; tic = now
            _, loss = model(codes, images, loss=t.loss)
            now = time.perf_counter(); parts["forward"] += now - tic; tic = now
            loss.backward()
            now = time.perf_counter(); parts["backward"] += now - tic; tic = now
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            trainer._set_lr(); opt.step(); opt.zero_grad(set_to_none=True)
            now = time.perf_counter(); parts["optimiser"] += now - tic; tic = now
            if i % t.log_every == 0:
                loss.item()
            now = time.perf_counter(); parts["sync"] += now - tic; tic = now
        trainer.lock.release()
        shutil.rmtree(work, ignore_errors=True)
        results["images cached" if cache_images else "images rendered"] = {k: v / steps * 1000 for k, v in parts.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default=REF, help="git revision measured as 'before'")
    parser.add_argument("--short", type=int, default=50)
    parser.add_argument("--long", type=int, default=350)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--profile-only", action="store_true")
    args = parser.parse_args()
    from scatgen.evaluation import cpu_or_gpu_name
    import torch

    print(f"machine: {cpu_or_gpu_name(torch.device('cpu'))}, torch threads {torch.get_num_threads()}, "
          f"usable cores {len(os.sched_getaffinity(0))}")
    if not args.profile_only:
        work = Path(tempfile.mkdtemp(prefix="scatgen-throughput-"))
        ref_tree = work / "ref"
        subprocess.run(["git", "worktree", "add", "--detach", str(ref_tree), args.ref], cwd=ROOT, check=True,
                       capture_output=True)
        trees = {"ref": ref_tree, "this": ROOT}
        try:
            for name in args.variants:  # untimed: fills each tree's code (and image) cache, compiles
                tree, overrides, *env = VARIANTS[name]
                train_seconds(trees[tree], 5, overrides, work, work / f"cache-{tree}", *env)
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in args.variants}
            for _ in range(args.repeats):
                for name in args.variants:
                    tree, overrides, *env = VARIANTS[name]
                    cache = work / f"cache-{tree}"
                    times[name].append((train_seconds(trees[tree], args.short, overrides, work, cache, *env),
                                        train_seconds(trees[tree], args.long, overrides, work, cache, *env)))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(ref_tree)], cwd=ROOT, capture_output=True)
            shutil.rmtree(work, ignore_errors=True)
        batch = 64
        base = None
        print(f"\nsteady state from {args.short}- and {args.long}-step runs, {args.repeats} repeats (median)\n")
        print("| variant | steps/s | images/s | first-call cost (s) | × before |")
        print("|---|---|---|---|---|")
        for name in args.variants:
            rates = [(args.long - args.short) / (tl - ts) for ts, tl in times[name]]
            rate = statistics.median(rates)
            first = statistics.median(ts - args.short / r for (ts, _), r in zip(times[name], rates))
            base = rate if base is None else base
            print(f"| {name} | {rate:.2f} | {rate * batch:.0f} | {max(first, 0):.1f} | {rate / base:.2f} |")
    print("\nwhere a step's time goes (this tree, ms per step, 200 steps)\n")
    print("| data path | data | forward | backward | optimiser | sync | total |")
    print("|---|---|---|---|---|---|---|")
    for name, parts in profile().items():
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in parts.values()) + f" | {sum(parts.values()):.1f} |")


if __name__ == "__main__":
    main()
