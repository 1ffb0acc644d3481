"""Bad inputs and faults, run as a user would meet them; prints a markdown table.

    python benchmarks/fault_cases.py              # every case (about 10 minutes on 2 cores)
    python benchmarks/fault_cases.py --only cache 4c  # cases whose name contains 'cache' or '4c'
    python benchmarks/fault_cases.py --only 21.    # issue 21's cases (inputs, outputs, signals)

Each case prepares a folder, runs train.py or sample.py in a fresh process, and states what a
correct outcome is (an exit status and text that must appear); the table says whether that held,
and whether any traceback reached the user. Nothing here is asserted away: a case that goes
wrong shows as such.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data.num_train=256", "--data.num_test=64", "--encoder.L=4", "--whitening.d=32",
        "--train.batch_size=32", "--train.max_steps=30", "--train.max_minutes=0", "--train.eval_every=10",
        "--train.checkpoint_every=10", "--train.warmup_steps=2", "--train.eval_images=32",
        "--prior.fit_steps=40", "--prior.latent=8", "--prior.autoencoder_steps=40", "--refine.steps=2"]
CONFIG = "configs/polygons.yaml"


@dataclass
class Case:
    name: str
    command: Callable[[Path], list[str]]  # work folder → argv after `python`
    expect_status: int | tuple[int, ...]
    expect_text: str  # must appear in stderr + stdout
    setup: Callable[[Path], None] = lambda work: None
    after: Callable[[Path], str] = lambda work: ""  # an extra check; returns a problem, or ""
    shown: str = ""  # the command as the table shows it
    tags: list[str] = field(default_factory=list)


def run(argv: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def train(work: Path, *extra: str, out: str = "run") -> list[str]:
    return ["train.py", CONFIG, *TINY, f"--run.out_dir={work / out}", f"--run.cache_dir={work / 'cache'}", *extra]


def trained(work: Path, *extra: str) -> None:
    result = run(train(work, *extra))
    if result.returncode != 0:
        raise RuntimeError(f"setup run failed: {result.stderr[-1500:]}")


def scribble(path: Path, n: int = 64, seed: int = 0) -> None:
    """n random bytes written into the middle of a file (its data region)."""
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    start = len(data) // 2
    for i in range(start, min(len(data), start + n)):
        data[i] = rng.randrange(256)
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def latest(work: Path) -> Path:
    return sorted((work / "run" / "checkpoints").glob("step-*"))[-1]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kill_during_whitening(work: Path) -> None:
    cmd = [sys.executable, *train(work, "--data.num_train=3000")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not any(p.stat().st_size > 0 for p in (work / "cache").glob(".spill-*.f32")) if (work / "cache").is_dir() else True:
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("the run ended before the kill")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def cases() -> list[Case]:
    def folder_with_split(work: Path, test: bool) -> None:
        from PIL import Image

        for split in ("train", "test") if test else ("train",):
            (work / "data" / split).mkdir(parents=True)
            for i in range(40):
                Image.new("RGB", (32, 32), (i * 6, 80, 160)).save(work / "data" / split / f"{i}.png")
        if not test:  # a test split that exists but is empty
            (work / "data" / "test").mkdir()

    config_hash = {}

    def remember_config(work: Path) -> None:
        trained(work)
        config_hash["before"] = sha(work / "run" / "config.yaml")

    def config_untouched(work: Path) -> str:
        return "" if sha(work / "run" / "config.yaml") == config_hash.get("before") else "config.yaml was overwritten"

    def nonfinite(path: Path) -> list[str]:
        from safetensors.torch import load_file
        import torch

        state = load_file(str(path))
        return [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]

    def finite_bundle(work: Path) -> str:
        path = work / "run" / "model" / "model.safetensors"
        bad = nonfinite(path) if path.is_file() else []
        return f"non-finite {bad[:2]} in the bundle" if bad else ""

    def checkpoints_finite(work: Path) -> str:
        for ckpt in (work / "run" / "checkpoints").glob("step-*"):
            bad = nonfinite(ckpt / "model.safetensors")
            if bad:
                return f"{ckpt.name} holds non-finite {bad[:2]}"
        return ""

    def no_tmp_left(work: Path) -> str:
        left = list(work.rglob(".tmp-*"))
        return f"left {left[0].name}" if left else ""

    def no_spill(work: Path) -> str:
        return "a spill file is left" if list((work / "cache").glob(".spill-*.f32")) else ""

    return [
        Case("1a NaN from a huge LR", lambda w: train(w, "--train.lr=3.5e7", "--train.grad_clip=0"), 1,
             "became", shown="train.py $TINY --train.lr=3.5e7 --train.grad_clip=0"),
        Case("1b resume with a lower LR after the NaN stop",
             lambda w: train(w, "--train.lr=1e-4", "--train.grad_clip=1", "--run.resume=latest"), (0, 1), "",
             setup=lambda w: run(train(w, "--train.lr=3.5e7", "--train.grad_clip=0", "--train.checkpoint_every=5")),
             after=finite_bundle, shown="… then --train.lr=1e-4 --train.grad_clip=1 --run.resume=latest"),
        Case("1c NaN stop after a good checkpoint, then resume with a lower LR",
             lambda w: train(w, "--train.lr=1e-4", "--train.max_steps=60", "--run.resume=latest"), 0, "lr 0.0001",
             setup=lambda w: (trained(w), run(train(w, "--train.lr=3.5e7", "--train.grad_clip=0", "--train.max_steps=60",
                                                    "--run.resume=latest"))),
             after=finite_bundle, shown="train to 30; resume --train.lr=3.5e7 (stops); resume --train.lr=1e-4"),
        Case("2 a checkpoint that would hold inf", lambda w: train(w, "--train.lr=3.3e7", "--train.grad_clip=0"), 1,
             "", after=checkpoints_finite, shown="train.py $TINY --train.lr=3.3e7 --train.grad_clip=0"),
        Case("3a resume with another encoder.J", lambda w: train(w, "--encoder.J=2", "--run.resume=latest"), 1,
             "encoder.J: 3 → 2", setup=remember_config, after=config_untouched,
             shown="train.py $TINY --encoder.J=2 --run.resume=latest"),
        Case("3b resume with another encoder.L", lambda w: train(w, "--encoder.L=2", "--run.resume=latest"), 1,
             "encoder.L: 4 → 2", setup=remember_config, after=config_untouched),
        Case("3c resume with another d", lambda w: train(w, "--whitening.d=16", "--run.resume=latest"), 1,
             "whitening.d: 32 → 16", setup=remember_config, after=config_untouched),
        Case("3d resume with another image size", lambda w: train(w, "--data.image_size=64", "--run.resume=latest"), 1,
             "data.image_size: 32 → 64", setup=remember_config, after=config_untouched),
        Case("3e resume with another generator",
             lambda w: train(w, "--generator.kind=sparse_deconv", "--run.resume=latest"), 1,
             "generator.kind", setup=remember_config, after=config_untouched),
        Case("4a fresh run into a used out_dir", lambda w: train(w), 1, "already holds a run", setup=trained),
        Case("4b the same with --run.overwrite=true", lambda w: train(w, "--run.overwrite=true"), 0, "",
             setup=trained),
        Case("4c two runs at once on one out_dir", lambda w: ["-c", (
            "import subprocess,sys;"
            f"a=[sys.executable,*{train(w)!r}];"
            "ps=[subprocess.Popen(a,stdout=subprocess.DEVNULL,stderr=subprocess.PIPE,text=True) for _ in range(2)];"
            "out=[p.communicate() for p in ps];codes=sorted(p.returncode for p in ps);"
            "print('exit codes',codes);print([l for o in out for l in o[1].splitlines() if 'error' in l][-1:],file=sys.stderr);"
            "sys.exit(0 if codes==[0,1] else 3)")], 0, "in use by another scatgen run",
             shown="two train.py $TINY processes on one out_dir"),
        Case("5a 64 random bytes in the code cache", lambda w: train(w, "--run.overwrite=true"), 0,
             "corrupt code cache entry", setup=lambda w: (trained(w), scribble(next((w / "cache").glob("codes-train-*")))),
             after=finite_bundle),
        Case("5b 64 random bytes in the whitening cache", lambda w: train(w, "--run.overwrite=true"), 0,
             "corrupt whitening cache entry",
             setup=lambda w: (trained(w), scribble(next((w / "cache").glob("whitening-*"))))),
        Case("5c 64 random bytes in the image cache", lambda w: train(w, "--run.overwrite=true"), 0,
             "images.u8", setup=lambda w: (trained(w), scribble(next((w / "cache").glob("images-train-*/images.u8"))))),
        Case("5d random bytes in a checkpoint's model.safetensors", lambda w: train(w, "--run.resume=latest",
             "--train.max_steps=40"), 0, "falling back",
             setup=lambda w: (trained(w), scribble(latest(w) / "model.safetensors"))),
        Case("5e truncated optimizer.bin", lambda w: train(w, "--run.resume=latest", "--train.max_steps=40"), 0,
             "falling back", setup=lambda w: (trained(w), truncate(next(latest(w).glob("optimizer*"))))),
        Case("5f truncated trainer_state.json", lambda w: train(w, "--run.resume=latest", "--train.max_steps=40"), 0,
             "falling back", setup=lambda w: (trained(w), truncate(latest(w) / "trainer_state.json"))),
        Case("5g random bytes in a bundle's model.safetensors",
             lambda w: ["sample.py", "sample", str(w / "run"), "--n", "4", "--refine", "0"], 1,
             "model.safetensors' is corrupt", setup=lambda w: (trained(w), scribble(w / "run/model/model.safetensors"))),
        Case("6a truncated bundle model.safetensors (bundle without checksums)",
             lambda w: ["sample.py", "sample", str(w / "run"), "--n", "4", "--refine", "0"], 1,
             "not a readable safetensors file", setup=lambda w: (trained(w), (w / "run/model/checksums.json").unlink(),
                                                                 truncate(w / "run/model/model.safetensors"))),
        Case("6b truncated bundle.json", lambda w: ["sample.py", "sample", str(w / "run"), "--n", "4"], 1,
             "bundle.json", setup=lambda w: (trained(w), truncate(w / "run/model/bundle.json"))),
        Case("6c bundle config.yaml not YAML (checksums refreshed)",
             lambda w: ["sample.py", "sample", str(w / "run"), "--n", "4"], 1, "not valid YAML",
             setup=lambda w: (trained(w), (w / "run/model/config.yaml").write_text("data: [unclosed\n"),
                              _refresh(w / "run/model"))),
        Case("6d config file not UTF-8", lambda w: ["train.py", str(w / "bad.yaml")], 2, "not UTF-8",
             setup=lambda w: (w / "bad.yaml").write_bytes(b"train:\n  lr: 1e-3 \xff\n")),
        Case("6e config path is a directory", lambda w: ["train.py", str(w)], 2, "is a directory"),
        Case("6f CelebA partition not UTF-8", lambda w: ["train.py", "configs/celeba64.yaml", f"--data.root={w}",
             f"--run.out_dir={w / 'run'}", f"--run.cache_dir={w / 'cache'}"], (1, 2), "not UTF-8",
             setup=lambda w: (_celeba(w))),
        Case("6g out_dir under a regular file", lambda w: train(w, f"--run.out_dir={w / 'file' / 'run'}"), 1,
             "regular file", setup=lambda w: (w / "file").write_text("x")),
        Case("6h cache_dir under a regular file", lambda w: train(w, f"--run.cache_dir={w / 'file' / 'c'}"), 1,
             "regular file", setup=lambda w: (w / "file").write_text("x")),
        Case("7a train.eval_images=0", lambda w: train(w, "--train.eval_images=0"), 2, "train.eval_images=0"),
        Case("7b train.grid_size=0", lambda w: train(w, "--train.grid_size=0"), 2, "train.grid_size=0"),
        Case("7c Adam beta 1.0", lambda w: train(w, "--train.betas=[0.9,1.0]"), 2, "train.betas"),
        Case("7d run.seed=-1", lambda w: train(w, "--run.seed=-1"), 2, "run.seed=-1"),
        Case("7e run.seed=2**40", lambda w: train(w, f"--run.seed={2**40}"), 2, "run.seed="),
        Case("7f train.num_workers=-1", lambda w: train(w, "--train.num_workers=-1"), 2, "num_workers=-1"),
        Case("7g train.lr=nan", lambda w: train(w, "--train.lr=nan"), 2, "train.lr=nan"),
        Case("7h gsn with a 48² folder", lambda w: train(w, "--data.name=folder", f"--data.root={w / 'data'}",
             "--data.image_size=48"), 2, "gsn generator makes sizes 4·2^k", setup=lambda w: folder_with_split(w, True)),
        Case("7i an empty test split", lambda w: train(w, "--data.name=folder", f"--data.root={w / 'data'}"), 1,
             "test split", setup=lambda w: folder_with_split(w, False), after=lambda w: "" if not (
                 w / "cache").exists() or not list((w / "cache").glob("codes-*")) else "encoded before refusing"),
        Case("8a sample --n 0", lambda w: ["sample.py", "sample", str(w / "run"), "--n", "0"], 2, "--n",
             setup=trained),
        Case("8b sample --n -1", lambda w: ["sample.py", "sample", str(w / "run"), "--n", "-1"], 2, "--n",
             setup=trained),
        Case("8c sample --nrow 0", lambda w: ["sample.py", "sample", str(w / "run"), "--nrow", "0"], 2, "--nrow",
             setup=trained),
        Case("8d sample --temperature 0", lambda w: ["sample.py", "sample", str(w / "run"), "--temperature", "0"], 2,
             "--temperature", setup=trained),
        Case("8e sample --temperature nan", lambda w: ["sample.py", "sample", str(w / "run"), "--temperature", "nan"],
             2, "--temperature", setup=trained),
        Case("8f interpolate --a test:abc", lambda w: ["sample.py", "interpolate", str(w / "run"), "--a", "test:abc",
             "--b", "test:1"], 1, "expected a whole number", setup=trained),
        Case("8g reconstruct --folder with one corrupt file", lambda w: ["sample.py", "reconstruct", str(w / "run"),
             "--folder", str(w / "data" / "train"), "--n", "64", "--refine", "0"], 0, "skipping unreadable image",
             setup=lambda w: (trained(w), folder_with_split(w, True),
                              (w / "data" / "train" / "broken.png").write_bytes(b"\x89PNG not really"))),
        Case("9 kill -9 during the whitening pass, then rerun", lambda w: train(w), 0,
             "scattering spill left by a killed run", setup=kill_during_whitening, after=no_spill),
        Case("10 a full run leaves no temporary folder", lambda w: train(w), 0, "", after=no_tmp_left),
    ] + issue21_cases()


# Issue 21: every input kind at every entry point -------------------------------------------------------------

_SHARED: dict[str, Path] = {}


def shared_run(work: Path) -> None:
    """A copy of one tiny trained run (trained once per replay) in work/run."""
    if "run" not in _SHARED:
        home = Path(tempfile.mkdtemp(prefix="scatgen-fault-shared-"))
        trained(home)
        _SHARED["run"] = home / "run"
    shutil.copytree(_SHARED["run"], work / "run")


API_PRELUDE = """
import sys, warnings, torch, numpy as np
sys.path.insert(0, {root!r})
warnings.simplefilter("always")
import scatgen
pipe = scatgen.load({run!r})
x = pipe.sample(4, seed=0, refine=0)
z = pipe.encode(x)
try:
{body}
except (TypeError, ValueError, FileNotFoundError) as e:
    print(f"{{type(e).__name__}}: {{e}}", file=sys.stderr)
    sys.exit(1)
"""


def api(body: str) -> Callable[[Path], list[str]]:
    """A Python API call on the shared run, in a fresh process; a refusal exits 1 with its one line."""
    def argv(work: Path) -> list[str]:
        code = "\n".join("    " + line for line in body.strip().splitlines())
        return ["-c", API_PRELUDE.format(root=str(ROOT), run=str(work / "run"), body=code)]
    argv.shown = body.replace("\n", "; ")  # type: ignore[attr-defined]
    return argv


def sample(work: Path, command: str, *extra: str) -> list[str]:
    return ["sample.py", command, str(work / "run"), *extra]


def issue21_cases() -> list[Case]:
    import torch

    def folder(work: Path, train_n: int = 40, test_n: int = 0, links: bool = False) -> None:
        from PIL import Image

        for split, n in (("train", train_n), ("test", test_n)):
            if n:
                (work / "data" / split).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (i * 6, 80 if split == "train" else 200, 160)).save(
                    work / "data" / split / f"{i}.png")
        if links:  # test/ reaches 9 train images, and train/ holds 10 second names of its own files
            for i in range(9):
                os.symlink(work / "data" / "train" / f"{i}.png", work / "data" / "test" / f"link{i}.png")
            for i in range(10):
                os.symlink(work / "data" / "train" / f"{i}.png", work / "data" / "train" / f"dup{i}.png")

    def no_codes(work: Path) -> str:
        return "encoded before refusing" if list((work / "cache").glob("codes-*")) else ""

    def individual_twice(work: Path) -> None:
        shared_run(work)
        run(sample(work, "sample", "--n", "4", "--refine", "0", "--individual", "--out", str(work / "o")))

    def eight_files(work: Path) -> str:
        n = len(list((work / "o").glob("sample-*.png")))
        return "" if n == 8 else f"{n} single images, expected 8 (two runs of 4)"

    def bad_cache(work: Path) -> None:
        shared_run(work)
        (work / "file").write_text("x")
        config = work / "run" / "model" / "config.yaml"
        lines = [f"  cache_dir: {work / 'file' / 'cache'}" if line.startswith("  cache_dir:") else line
                 for line in config.read_text().splitlines()]
        config.write_text("\n".join(lines) + "\n")
        _refresh(work / "run" / "model")

    def bomb(work: Path) -> None:
        lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        lines += [f"{b}: &{b} [" + ",".join([f"*{a}"] * 9) + "]" for a, b in zip("abcdefgh", "bcdefghi")]
        (work / "bomb.yaml").write_text("\n".join(lines) + "\ntrain:\n  betas: *i\n")

    def sigterm(work: Path) -> None:
        proc = subprocess.Popen([sys.executable, *train(work)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 300
        while not (work / "run" / "checkpoints" / "step-0000010").is_dir():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the run ended before SIGTERM")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate()
        (work / "sigterm.txt").write_text(f"{proc.returncode}\n{out}\n{err}")

    def stopped_cleanly(work: Path) -> str:
        status, text = (work / "sigterm.txt").read_text().split("\n", 1)
        problems = [] if status == "143" else [f"SIGTERM exit {status}, expected 143"]
        problems += [] if "interrupted by SIGTERM" in text and "checkpoint saved" in text else ["no message"]
        problems += [] if list((work / "run" / "checkpoints").glob("step-*")) else ["no checkpoint"]
        return "; ".join(problems)

    def resumed_to_the_end(work: Path) -> str:
        metrics = work / "run" / "metrics.json"
        import json

        return "" if metrics.is_file() and json.loads(metrics.read_text())["steps"] == 30 else "not 30 steps"

    gpu = torch.cuda.is_available()
    folder_train = lambda w, *extra: train(w, "--data.name=folder", f"--data.root={w / 'data'}",  # noqa: E731
                                           "--train.batch_size=8", *extra)
    return [
        Case("21.1a encode of 0–255 floats", api("pipe.encode((x + 1) * 127.5)"), 1, "0–255 values",
             setup=shared_run, shown="pipe.encode((x + 1) * 127.5)"),
        Case("21.1b encode of [0, 1] floats (ToTensor)", api("pipe.encode((x + 1) / 2)"), 0, "ToTensor",
             setup=shared_run, shown="pipe.encode((x + 1) / 2)"),
        Case("21.1c reconstruct of uint8", api(
            "u = ((x + 1) * 127.5).round().to(torch.uint8)\n"
            "assert torch.allclose(pipe.encode(u), pipe.encode(u.float() / 127.5 - 1))\n"
            "print('uint8 converted', tuple(pipe.reconstruct(u, refine=0).shape))"), 0, "uint8 converted",
             setup=shared_run, shown="pipe.reconstruct(uint8 images)"),
        Case("21.2 folder with symlinks across and within splits", lambda w: ["-c", (
            f"import sys, os; sys.path.insert(0, {str(ROOT)!r})\n"
            "from scatgen.data.folder import ImageFolderDataset as F\n"
            f"s = {{k: F({str(w / 'data')!r}, k, 32, split_mode='folders') for k in ('train', 'test')}}\n"
            "ino = {k: [os.stat(p).st_ino for p in d.files] for k, d in s.items()}\n"
            "print('shared', len(set(ino['train']) & set(ino['test'])), 'duplicated',"
            " sum(len(v) - len(set(v)) for v in ino.values()))")], 0, "shared 0 duplicated 0",
             setup=lambda w: folder(w, 40, 20, links=True), shown="ImageFolderDataset of train/ + test/ with links"),
        Case("21.3 sample --individual, then other settings", lambda w: sample(
            w, "sample", "--n", "4", "--refine", "0", "--individual", "--prior", "normal", "--temperature", "0.5",
            "--out", str(w / "o")), 0, "wrote", setup=individual_twice, after=eight_files),
        Case("21.4 a config with two train: sections", lambda w: ["train.py", str(w / "dup.yaml")], 2,
             "key 'train' appears twice", setup=lambda w: (w / "dup.yaml").write_text(
                 "train:\n  lr: 0.01\nrun:\n  seed: 1\ntrain:\n  max_steps: 5\n")),
        Case("21.5 whitening.d=300 with 256 train images", lambda w: train(w, "--whitening.d=300"), 0,
             "code components will be degenerate"),
        Case("21.6a decode of a NaN code", api("z[0, 0] = float('nan'); pipe.decode(z, refine=0)"), 1,
             "NaN or infinite", setup=shared_run, shown="pipe.decode(z with a NaN, refine=0)"),
        Case("21.6b refined decode of an inf code", api("z[1, 2] = float('inf'); pipe.decode(z, refine=2)"), 1,
             "NaN or infinite", setup=shared_run, shown="pipe.decode(z with an inf, refine=2)"),
        Case("21.6c reconstruct of a NaN pixel", api("x[0, 0, 0, 0] = float('nan'); pipe.reconstruct(x)"), 1,
             "NaN or infinite", setup=shared_run, shown="pipe.reconstruct(x with a NaN)"),
        Case("21.7 decode(dims=-1)", api("pipe.decode(z, refine=1, dims=-1)"), 1, "dims", setup=shared_run),
        Case("21.8a sample --out an existing file", lambda w: sample(w, "sample", "--out", str(w / "file")), 1,
             "a file is in the way", setup=lambda w: (shared_run(w), (w / "file").write_text("x"))),
        Case("21.8b evaluate --out under a file", lambda w: sample(w, "evaluate", "--out", str(w / "file" / "o")), 1,
             "regular file", setup=lambda w: (shared_run(w), (w / "file").write_text("x"))),
        Case("21.8c reconstruct --out under a file", lambda w: sample(w, "reconstruct", "--out", str(w / "f" / "o")),
             1, "regular file", setup=lambda w: (shared_run(w), (w / "f").write_text("x"))),
        Case("21.8d sample into a read-only run folder", lambda w: sample(w, "sample"), 1, "writable",
             setup=lambda w: (shared_run(w), read_only(w / "run"))),
        Case("21.8g evaluate in a read-only run folder", lambda w: sample(w, "evaluate"), 1, "writable",
             setup=lambda w: (shared_run(w), read_only(w / "run"))),
        Case("21.8h fit-prior into a read-only bundle", lambda w: sample(w, "fit-prior", "--kind", "gmm"), 1,
             "writable", setup=lambda w: (shared_run(w), read_only(w / "run" / "model"))),
        Case("21.8e bundle whose cache folder is unusable", lambda w: sample(
            w, "reconstruct", "--n", "2", "--refine", "0"), 1, "--cache-dir", setup=bad_cache),
        Case("21.8f the same with --cache-dir", lambda w: sample(
            w, "reconstruct", "--n", "2", "--refine", "0", "--cache-dir", str(w / "mine")), 0, "wrote",
             setup=bad_cache),
        Case("21.9 evaluate --inception missing", lambda w: sample(w, "evaluate", "--inception", str(w / "no.pt")),
             1, "--inception", setup=shared_run),
        Case("21.10a decode of float64 codes", api("print(pipe.decode(z.double(), refine=0).dtype)"), 0,
             "torch.float32", setup=shared_run),
        Case("21.10b decode of int codes", api("pipe.decode(z.long())"), 1, "floating-point tensor",
             setup=shared_run),
        Case("21.10c decode of bool codes", api("pipe.decode(z > 0)"), 1, "floating-point tensor", setup=shared_run),
        Case("21.10d decode of a NumPy array", api("pipe.decode(z.numpy())"), 1, "torch.from_numpy",
             setup=shared_run),
        Case("21.10e sample(2.5)", api("pipe.sample(2.5)"), 1, "whole number", setup=shared_run),
        Case("21.10f interpolate(steps=2.5)", api("pipe.interpolate(z[0], z[1], steps=2.5)"), 1, "whole number",
             setup=shared_run),
        Case("21.10g sample(seed=2**70)", api("pipe.sample(2, seed=2**70)"), 1, "2^63", setup=shared_run),
        Case("21.10h interpolate --a seed:2**70", lambda w: sample(w, "interpolate", "--a", f"seed:{2**70}",
             "--b", "seed:1", "--refine", "0"), 1, "2^63", setup=shared_run),
        Case("21.10i sample --seed 2**70", lambda w: sample(w, "sample", "--seed", str(2**70)), 2, "2^63",
             setup=shared_run),
        Case("21.11a encode and reconstruct of 0 images", api(
            "e = torch.empty(0, 3, 32, 32)\nprint('empty', tuple(pipe.encode(e).shape), "
            "tuple(pipe.reconstruct(e).shape), tuple(pipe.decode(torch.empty(0, pipe.d), refine=2).shape))"), 0,
             "empty (0, 32) (0, 3, 32, 32) (0, 3, 32, 32)", setup=shared_run),
        Case("21.11b folder run whose test split holds one image", lambda w: folder_train(w), 1, "at least 2",
             setup=lambda w: folder(w, 40, 1), after=no_codes),
        Case("21.12a --device cuda", lambda w: sample(w, "sample", "--n", "2", "--device", "cuda", "--refine", "0"),
             0 if gpu else 2, "wrote" if gpu else "no CUDA GPU", setup=shared_run),
        Case("21.12b --device gpu0", lambda w: sample(w, "sample", "--device", "gpu0"), 2, "unknown device 'gpu0'",
             setup=shared_run),
        Case("21.13 YAML alias bomb", lambda w: ["train.py", str(w / "bomb.yaml")], 2, "expand to more than",
             setup=bomb),
        Case("21.14a interpolate --steps 100000", lambda w: sample(w, "interpolate", "--a", "seed:0", "--b", "seed:1",
             "--steps", "100000"), 2, "at most 256", setup=shared_run),
        Case("21.14b sample --n 100000 (a grid)", lambda w: sample(w, "sample", "--n", "100000"), 2,
             "pass --individual", setup=shared_run),
        Case("21.14c sample --n 600 --individual", lambda w: sample(w, "sample", "--n", "600", "--individual",
             "--refine", "0", "--out", str(w / "o")), 0, "the grid shows the first 256", setup=shared_run,
             after=lambda w: "" if len(list((w / "o").glob("sample-*.png"))) == 600 else "not 600 files"),
        Case("21.15a SIGTERM during training", lambda w: ["-c", "print(open('/dev/null').read())"], 0, "",
             setup=sigterm, after=stopped_cleanly, shown="train.py $TINY; SIGTERM after step 10"),
        Case("21.15b resume after SIGTERM", lambda w: train(w, "--run.resume=latest"), 0, "resumed from",
             setup=sigterm, after=resumed_to_the_end),
    ]


def read_only(folder: Path) -> None:
    """Make a folder refuse new entries, for root too (chattr +i; chmod where that is not allowed)."""
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        folder.chmod(0o555)


def _writable_again(work: Path) -> None:
    subprocess.run(["chattr", "-R", "-i", str(work)], capture_output=True)
    for path in [work, *work.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)


def _refresh(folder: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from scatgen.integrity import write_manifest

    write_manifest(folder)


def _celeba(work: Path) -> None:
    folder = work / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    (folder / "list_eval_partition.txt").write_bytes(b"000001.jpg 0\n\xff\xfe 2\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=[], help="run the cases whose name contains one of these")
    args = parser.parse_args()
    print("| case | command | exit | what the user sees (last line) | verdict |")
    print("|---|---|---|---|---|")
    for case in cases():
        if args.only and not any(part in case.name for part in args.only):
            continue
        work = Path(tempfile.mkdtemp(prefix="scatgen-fault-"))
        argv, result = [], None
        try:
            case.setup(work)
            argv = case.command(work)
            result = run(argv)
            text = result.stderr + result.stdout
            lines = [l for l in result.stderr.splitlines() if l.strip() and not l.startswith(("training", "fitting", "\r"))]
            seen = next((l for l in reversed(lines) if "error" in l or "warning" in l.lower()), lines[-1] if lines else "")
            expected = (case.expect_status,) if isinstance(case.expect_status, int) else case.expect_status
            problems = []
            if result.returncode not in expected:
                problems.append(f"exit {result.returncode}, expected {expected}")
            if case.expect_text and case.expect_text not in text:
                problems.append(f"no '{case.expect_text}'")
            if "Traceback" in text:
                problems.append("traceback")
            problems += [p for p in [case.after(work)] if p]
            verdict = "ok" if not problems else "WRONG: " + "; ".join(problems)
        except Exception as e:  # a broken case is reported, never hidden
            verdict, seen, result = f"CASE FAILED: {e}", "", None
        shown = case.shown or getattr(case.command, "shown", "") or " ".join(
            argv if result is not None else []).replace(str(work), "$W")
        shown = shown.replace(" ".join(TINY), "$TINY").replace(" --run.out_dir=$W/run --run.cache_dir=$W/cache", "")
        status = result.returncode if result is not None else "-"
        cell = seen.replace("|", "\\|").strip()[:160]
        print(f"| {case.name} | `{shown[:110]}` | {status} | {cell} | {verdict} |", flush=True)
        _writable_again(work)
        shutil.rmtree(work, ignore_errors=True)
    if "run" in _SHARED:
        shutil.rmtree(_SHARED["run"].parent, ignore_errors=True)


if __name__ == "__main__":
    main()
