"""One tree's refinement, in its own process, for `refinement_cost.py --ref`.

    python benchmarks/refine_worker.py TREE DATA

Imports scatgen from TREE (a checkout of any commit whose refinement has the
`refine_reconstructions(scattering, start, images, cfg)` API), loads the G outputs and test
images of DATA (a torch file written by refinement_cost.py), refines once to warm up, says
"ready", then answers each stdin line {"cfg": {RefineConfig fields}, "out": PATH} by refining,
saving the refined images to PATH and printing {"seconds": ...}. The driver computes the PSNR,
so both trees are scored by the same code.
"""

import json
import sys
import time
from dataclasses import fields, replace

tree, data = sys.argv[1], sys.argv[2]
sys.path.insert(0, tree)

import torch  # noqa: E402

import scatgen  # noqa: E402
from scatgen.config import RefineConfig  # noqa: E402
from scatgen.refinement import refine_reconstructions  # noqa: E402
from scatgen.scattering import Scattering  # noqa: E402


def main() -> None:
    d = torch.load(data)
    scattering = Scattering(d["J"], d["size"], d["L"])
    known = {f.name for f in fields(RefineConfig)}
    refine_reconstructions(scattering, d["start"][:8], d["images"][:8], replace(RefineConfig(), steps=3))
    print(json.dumps({"ready": True, "scatgen": scatgen.__file__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        unknown = set(request["cfg"]) - known
        if unknown:
            raise SystemExit(f"{tree}: its RefineConfig has no field {sorted(unknown)}")
        cfg = replace(RefineConfig(), **request["cfg"])
        tic = time.perf_counter()
        refined = refine_reconstructions(scattering, d["start"], d["images"], cfg)
        seconds = time.perf_counter() - tic
        torch.save(refined, request["out"])
        print(json.dumps({"seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
