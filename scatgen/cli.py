"""The `scatgen` command: train a model, then use it.

    scatgen train polygons                                   a packaged config (see below), or a YAML file
    scatgen train polygons --train.max_steps=500 --run.out_dir=runs/quick
    scatgen train configs/celeba64.yaml --data.root=/data/celeba-root
    scatgen train polygons --run.resume=latest               continue a stopped run
    scatgen sample runs/polygons --n 64 --seed 0 [--prior flow] [--refine 100]
    scatgen interpolate runs/polygons --a test:0 --b test:1 --steps 10 [--spherical]
    scatgen reconstruct runs/polygons --split test --n 32     (or --images a.png b.jpg, or --folder DIR)
    scatgen evaluate runs/polygons                            evaluation.json + evaluation.md
    scatgen fit-prior runs/polygons --kind gmm                adds a prior to the bundle
    scatgen atoms runs/polygons-sparse                        dictionaries of sparse_deconv generators
    scatgen --version

`scatgen COMMAND --help` lists a command's options. RUN is a run directory or its model/ bundle.
`train` takes dotted overrides of any config field; the packaged configs are those in the
project's configs/ folder, shipped inside the package.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

# configs/ at the project root, reached through the package's configs symlink, so the same YAML
# files serve a source checkout and an installed wheel (which holds copies of them).
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_configs() -> dict[str, Path]:
    """{name: path} of the configs shipped in the package, e.g. 'polygons' → .../configs/polygons.yaml."""
    return {p.stem: p for p in sorted(PACKAGED_CONFIGS.glob("*.yaml"))}


def find_config(name: str) -> Path:
    """A YAML file path as given, or the packaged config of that name (with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        raise ValueError(f"config file '{path}' is a directory; pass a YAML file such as configs/polygons.yaml "
                         f"or a packaged config name such as polygons")
    packaged = packaged_configs()
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    if stem in packaged and path.parent in (Path("."), Path("configs")):
        return packaged[stem]
    raise FileNotFoundError(f"config '{name}' is neither a file nor a packaged config; packaged configs: "
                            f"{', '.join(packaged) or 'none (the package was installed without them)'}")


def train(argv: list[str], usage: str = __doc__, use_command: str = "scatgen") -> int:
    """`train CONFIG [--section.field=value ...]`: train, write the bundle and pictures, say where."""
    from safetensors import SafetensorError

    from scatgen.checkpoints import RunDirectoryInUse
    from scatgen.config import load_config, parse_overrides
    from scatgen.training import NonFiniteLossError, Trainer, TrainingStopped
    from scatgen.utils import describe_os_error

    from scatgen.utils import one_line_warnings

    one_line_warnings()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    try:
        cfg = load_config(find_config(argv[0]), parse_overrides(argv[1:]))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def stop(signum, frame):
        raise TrainingStopped(signum)

    # SIGTERM, like Ctrl-C, unwinds (locks released, spill files removed); inside the training
    # loop the trainer's own handler turns either into a checkpoint first.
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        trainer = Trainer(cfg)
        metrics = trainer.train()
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if not getattr(e, "checkpointed", False):  # the trainer has said what it saved
            print(f"stopped by {signal.Signals(signum).name} outside the training steps; finished caches and "
                  f"checkpoints are kept: run the same command again (with --run.resume=latest once a checkpoint "
                  f"exists) to continue", file=sys.stderr)
        return 128 + signum
    except (ValueError, FileNotFoundError, NonFiniteLossError, RunDirectoryInUse) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # read-only or full disk, a path under a regular file, …
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    except SafetensorError as e:  # safetensors reports a failed write (a full disk) as its own error
        print(f"error: could not write a weights file ({str(e).splitlines()[0]}); free some disk space or point "
              f"run.out_dir at another disk, then continue with --run.resume=latest", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)

    if trainer.accelerator.is_main_process:
        print(f"test PSNR {metrics['test/psnr']:.2f} dB after {metrics['steps']} steps "
              f"({metrics['minutes']:.1f} min)")
        print(f"bundle:   {trainer.paths.model}")
        print(f"pictures: {trainer.paths.images}/{{reconstructions,samples,samples-by-prior,interpolation,variations}}.png")
        print(f"logs:     tensorboard --logdir {trainer.paths.logs}")
        root = trainer.paths.root
        also = "" if use_command == "scatgen" else f", or scatgen evaluate {root}"
        print(f"next:     {use_command} evaluate {root}{also}   (PSNR, FID, precision/recall; raw G against refined)")
        print(f"          {use_command} sample {root} --n 64, or scatgen.load(\"{root}\") in Python "
              f"(the README walks through it)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The console entry point: `scatgen train ...`, `scatgen sample ...`, ...; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print(f"packaged configs: {', '.join(packaged_configs())}")
        return 0 if argv else 2
    if argv[0] == "--version":
        from scatgen import __version__

        print(f"scatgen {__version__}")
        return 0
    if argv[0] == "train":
        return train(argv[1:])
    from scatgen.commands import COMMANDS
    from scatgen.commands import main as use

    if argv[0] not in COMMANDS:
        print(f"error: unknown command '{argv[0]}'; expected one of train, {', '.join(COMMANDS)} "
              f"(scatgen --help lists them)", file=sys.stderr)
        return 2
    return use(argv, prog="scatgen", description=__doc__)
