"""Use a trained model: sample, interpolate, vary, reconstruct, evaluate, fit-prior, atoms.

    python sample.py sample runs/polygons --n 64 --seed 0 --prior flow --refine 100
    python sample.py interpolate runs/polygons --a test:0 --b test:1 --steps 10   (through the prior)
    python sample.py interpolate runs/polygons --a test:0 --b test:1 --path code --spherical
    python sample.py vary runs/polygons --image test:3 --strength 0.5 --n 15
    python sample.py interpolate runs/polygons --a seed:1 --b seed:2 --prior normal --refine 0
    python sample.py reconstruct runs/polygons --split test --n 32
    python sample.py reconstruct runs/polygons --images a.png b.jpg    (or --folder DIR)
    python sample.py evaluate runs/polygons --inception /path/to/inception.pt
    python sample.py fit-prior runs/polygons --kind gmm                  (adds a prior to the bundle)
    python sample.py atoms runs/polygons-sparse                          (sparse_deconv generators)

RUN is a run directory or its model/ bundle. Pictures go to RUN/samples/ unless --out says otherwise.
--refine K runs K steps of scattering refinement after G (0 = G alone; default: the bundle's
refine.steps). --prior picks the code prior (default: the bundle's prior.kind, or normal).
"""

import sys

from scatgen.cli import use

if __name__ == "__main__":
    sys.exit(use(sys.argv[1:], prog="sample.py", description=__doc__))
