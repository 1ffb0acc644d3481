"""Train a generative scattering network.

    python train.py configs/polygons.yaml
    python train.py configs/polygons.yaml --train.max_steps=500 --run.out_dir=runs/quick
    python train.py configs/polygons.yaml --run.resume=latest          # continue a stopped run
    accelerate launch --num_processes 2 train.py configs/celeba64.yaml --data.root=/data

config → data → encode (scattering + whitening, cached) → train generator → bundle + pictures
"""

import sys

from scatgen.checkpoints import RunDirectoryInUse
from scatgen.config import load_config, parse_overrides
from scatgen.training import NonFiniteLossError, Trainer
from scatgen.utils import describe_os_error


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], parse_overrides(argv[1:]))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        trainer = Trainer(cfg)
        metrics = trainer.train()
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, NonFiniteLossError, RunDirectoryInUse) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # read-only or full disk, a path under a regular file, …
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 1

    if trainer.accelerator.is_main_process:
        print(f"test PSNR {metrics['test/psnr']:.2f} dB after {metrics['steps']} steps "
              f"({metrics['minutes']:.1f} min)")
        print(f"bundle:   {trainer.paths.model}")
        print(f"pictures: {trainer.paths.images}/{{reconstructions,samples,samples-by-prior,interpolation}}.png")
        print(f"logs:     tensorboard --logdir {trainer.paths.logs}")
        print(f"next:     python sample.py evaluate {trainer.paths.root}   (PSNR, FID, precision/recall; "
              f"raw G against refined)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
