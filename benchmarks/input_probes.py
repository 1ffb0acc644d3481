"""Each input kind at each entry point, in this process: prints a markdown table of outcomes.

    python benchmarks/input_probes.py [RUN]     # RUN: a trained run (default: train a tiny one, ~1 min)

An outcome is `ok` (the call returned; its shape or dtype shown), `refused` (TypeError, ValueError,
FileNotFoundError, or a command's exit status 1/2, with its first line), or `INTERNAL` (any other
exception: what a user should never see). `ok` rows that hold NaN say so. Complements
benchmarks/fault_cases.py, which runs the issue's cases in fresh processes.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def outcome(call) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = call()
        except (TypeError, ValueError, FileNotFoundError) as e:
            return f"refused: {type(e).__name__}: {str(e).splitlines()[0][:110]}"
        except Exception as e:  # noqa: BLE001 — the point is to see them
            return f"INTERNAL: {type(e).__name__}: {str(e).splitlines()[0][:110] if str(e) else ''}"
    note = f" (warns: {str(caught[0].message)[:60]}…)" if caught else ""
    if isinstance(value, torch.Tensor):
        nan = " **NaN**" if value.is_floating_point() and not torch.isfinite(value).all() else ""
        return f"ok {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}{nan}{note}"
    return f"ok {type(value).__name__}{note}"


def command(*argv: str) -> str:
    from scatgen.cli import use as main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(list(argv), prog="sample.py")
        except SystemExit as e:
            status = e.code
        except Exception as e:  # noqa: BLE001
            return f"INTERNAL: {type(e).__name__}: {str(e)[:100]}"
    lines = [line for line in err.getvalue().splitlines() if "error" in line or "interrupted" in line]
    text = lines[-1][:120] if lines else ""
    return f"exit {status}" + (f": {text}" if text else "")


def main(scratch: Path) -> None:
    import scatgen
    from scatgen.config import load_config, parse_overrides

    if len(sys.argv) > 1:
        run = Path(sys.argv[1])
    else:
        from conftest import tiny_overrides
        from scatgen.training import Trainer

        tmp = scratch / "trained"
        Trainer(load_config(None, tiny_overrides(tmp)), progress=False).train()
        run = tmp / "run"
    pipe = scatgen.load(run)
    n, d = pipe.image_size, pipe.d
    x = pipe.sample(3, seed=0, refine=0)
    z = pipe.encode(x)
    nan_x, nan_z, inf_x, inf_z = x.clone(), z.clone(), x.clone(), z.clone()
    nan_x[0, 0, 0, 0], nan_z[0, 0], inf_x[1, 2, 3, 4], inf_z[1, 2] = math.nan, math.nan, math.inf, -math.inf
    images = {
        "float in [-1, 1]": x, "float in [0, 1]": (x + 1) / 2, "float in [0, 255]": (x + 1) * 127.5,
        "uint8": ((x + 1) * 127.5).round().to(torch.uint8), "int64 0–255": ((x + 1) * 127.5).long(),
        "bool": x > 0, "float64": x.double(), "float16": x.half(), "NaN pixel": nan_x,
        "inf pixel": inf_x, "empty (0, 3, N, N)": x[:0], "NumPy array": x.numpy(),
        "list": x.tolist(), "one image (3, N, N)": x[0], "wrong size": torch.zeros(1, 3, n // 2, n // 2),
    }
    codes = {
        "float32": z, "float64": z.double(), "float16": z.half(), "int64": z.long(), "bool": z > 0,
        "NaN": nan_z, "-inf": inf_z, "empty (0, d)": z[:0], "NumPy array": z.numpy(),
        "list": z.tolist(), f"wrong d ({d + 1})": torch.zeros(1, d + 1), "one code (d,)": z[0],
    }
    rows: list[tuple[str, str, str]] = []

    def probe(entry: str, kind: str, call) -> None:
        rows.append((entry, kind, outcome(call)))

    for kind, value in images.items():
        probe("encode", kind, lambda v=value: pipe.encode(v))
        probe("reconstruct(refine=1)", kind, lambda v=value: pipe.reconstruct(v, refine=1))
    for kind, value in codes.items():
        probe("decode(refine=0)", kind, lambda v=value: pipe.decode(v, refine=0))
        probe("decode(refine=1)", kind, lambda v=value: pipe.decode(v, refine=1))
        probe("interpolate_codes", kind, lambda v=value: pipe.interpolate_codes(v, v, torch.linspace(0, 1, 3)))
    probe("interpolate_codes", "3 codes against 2", lambda: pipe.interpolate_codes(z, z[:2], torch.linspace(0, 1, 3)))
    for kind, (a, b) in {"codes": (z[0], z[1]), "images": (x[0], x[1]), "0–255 image": (x[0] * 127.5 + 127.5, x[1]),
                         "NaN code": (nan_z[0], z[1]), "int code": (z[0].long(), z[1]),
                         "NumPy code": (z[0].numpy(), z[1])}.items():
        probe("interpolate(steps=3)", kind, lambda a=a, b=b: pipe.interpolate(a, b, steps=3, refine=0))
        probe("vary(n=2)", kind, lambda a=a: pipe.vary(a, n=2, refine=0))
    numbers = {"2.5": 2.5, "True": True, "0": 0, "-1": -1, "NumPy int64 3": np.int64(3), "'3'": "3", "None": None}
    for kind, value in numbers.items():
        probe("sample(n)", kind, lambda v=value: pipe.sample(v, refine=0))
        probe("interpolate(steps)", kind, lambda v=value: pipe.interpolate(z[0], z[1], steps=v, refine=0))
        probe("vary(n)", kind, lambda v=value: pipe.vary(z[0], n=v, refine=0))
        probe("decode(refine)", kind, lambda v=value: pipe.decode(z, refine=v))
        probe("decode(dims)", kind, lambda v=value: pipe.decode(z, refine=1, dims=v))
        probe("encode(batch_size)", kind, lambda v=value: pipe.encode(x, batch_size=v))
    for kind, value in {"2**70": 2**70, "-1": -1, "2.5": 2.5, "NumPy int64": np.int64(7), "'1'": "1"}.items():
        probe("sample(seed)", kind, lambda v=value: pipe.sample(2, seed=v, refine=0))
        probe("vary(seed)", kind, lambda v=value: pipe.vary(z[0], n=2, seed=v, refine=0))
    for kind, value in {"0": 0, "nan": math.nan, "inf": math.inf, "'hot'": "hot", "True": True}.items():
        probe("sample(temperature)", kind, lambda v=value: pipe.sample(2, temperature=v, refine=0))
    for kind, value in {"nan": math.nan, "1.5": 1.5, "'half'": "half"}.items():
        probe("vary(strength)", kind, lambda v=value: pipe.vary(z[0], strength=v, n=2, refine=0))
    for kind, value in {"'nope'": "nope", "5": 5}.items():
        probe("sample(prior)", kind, lambda v=value: pipe.sample(2, prior=v, refine=0))
    for kind, value in {"'gpu0'": "gpu0", "'cuda'": "cuda", "'cuda:3'": "cuda:3", "'CPU'": "CPU", "5": 5}.items():
        probe("scatgen.load(device)", kind, lambda v=value: scatgen.load(run, device=v))
    probe("scatgen.load", "a file", lambda: scatgen.load(run / "config.yaml"))
    probe("scatgen.load", "missing folder", lambda: scatgen.load(run / "nope"))

    # Configs (train.py's entry, in process).
    work = scratch / "work"
    work.mkdir()
    yaml_files = {
        "duplicated section": "train:\n  lr: 0.01\ntrain:\n  max_steps: 5\n",
        "duplicated field": "train:\n  lr: 0.01\n  lr: 0.02\n",
        "alias bomb": "a: &a [1,1,1,1,1,1,1,1,1]\n" + "".join(
            f"{b}: &{b} [{','.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi")),
        "list as a section": "train: [1, 2]\n",
        "huge integer": f"train:\n  max_steps: {2**70}\n",
        "nan float": "whitening:\n  eps: .nan\n",
        "anchors (legal)": "train:\n  betas: &b [0.9, 0.99]\nprior:\n  dims: 8\n",
    }
    for kind, text in yaml_files.items():
        (work / "c.yaml").write_text(text)
        probe("load_config(file)", kind, lambda: load_config(work / "c.yaml"))
    probe("parse_overrides", "key twice (last wins)", lambda: parse_overrides(["--train.lr=1", "--train.lr=2"]))
    probe("load_config(override)", "run.seed=2**40", lambda: load_config(None, {"run.seed": str(2**40)}))

    # Commands (sample.py / scatgen), in process.
    (work / "file").write_text("x")
    out = ["--out", str(work / "o")]
    for kind, argv in {
        "--out an existing file": ["sample", str(run), "--out", str(work / "file")],
        "--out under a file": ["reconstruct", str(run), "--out", str(work / "file" / "o")],
        "--cache-dir under a file": ["reconstruct", str(run), "--n", "2", "--cache-dir", str(work / "file" / "c"), *out],
        "--seed 2**70": ["sample", str(run), "--seed", str(2**70), *out],
        "--seed -1": ["sample", str(run), "--seed", "-1", *out],
        "--device gpu0": ["sample", str(run), "--device", "gpu0", *out],
        "--n 100000 (grid)": ["sample", str(run), "--n", "100000", *out],
        "--steps 100000": ["interpolate", str(run), "--a", "seed:0", "--b", "seed:1", "--steps", "100000", *out],
        "--a seed:2**70": ["interpolate", str(run), "--a", f"seed:{2**70}", "--b", "seed:1", "--refine", "0", *out],
        "--a missing file": ["interpolate", str(run), "--a", str(work / "no.png"), "--b", "seed:1", *out],
        "--a a folder": ["interpolate", str(run), "--a", str(work), "--b", "seed:1", *out],
        "--a test:99999": ["interpolate", str(run), "--a", "test:99999", "--b", "seed:1", *out],
        "--image seed:-1": ["vary", str(run), "--image", "seed:-1", *out],
        "--n 100000 (vary)": ["vary", str(run), "--image", "seed:1", "--n", "100000", *out],
        "--images a text file": ["reconstruct", str(run), "--images", str(work / "file"), *out],
        "--folder empty": ["reconstruct", str(run), "--folder", str(work / "o"), *out],
        "--n 100000 (reconstruct)": ["reconstruct", str(run), "--n", "100000", *out],
        "--inception missing": ["evaluate", str(run), "--inception", str(work / "no.pt"), *out],
        "--num-fid 2": ["evaluate", str(run), "--num-fid", "2", *out],
        "fit-prior --fit-steps 0": ["fit-prior", str(run), "--fit-steps", "0"],
        "RUN a missing folder": ["sample", str(work / "nope"), *out],
    }.items():
        (work / "o").mkdir(exist_ok=True)
        rows.append((f"sample.py {argv[0]}", kind, command(*argv)))

    print("| entry point | input | outcome |")
    print("|---|---|---|")
    for entry, kind, result in rows:
        print(f"| {entry} | {kind} | {result.replace('|', '/')} |")
    internal = sum("INTERNAL" in r for _, _, r in rows)
    nan = sum("NaN**" in r for _, _, r in rows)
    print(f"\n{len(rows)} probes: {internal} internal errors, {nan} NaN results")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="scatgen-probe-") as scratch:
        main(Path(scratch))
