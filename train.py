"""Train a generative scattering network.

    python train.py configs/polygons.yaml
    python train.py configs/polygons.yaml --train.max_steps=500 --run.out_dir=runs/quick
    python train.py configs/polygons.yaml --run.resume=latest          # continue a stopped run
    accelerate launch --num_processes 2 train.py configs/celeba64.yaml --data.root=/data

config → data → encode (scattering + whitening, cached) → train generator → bundle + pictures
`scatgen train polygons ...` runs the same code once scatgen is installed.
"""

import sys

from scatgen.cli import train

if __name__ == "__main__":
    sys.exit(train(sys.argv[1:], usage=__doc__, use_command="python sample.py"))
