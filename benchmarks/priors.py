"""Code priors against the perfect-prior ceiling, in one run, judged by the images they give.

    python benchmarks/priors.py runs/polygons                      # N=500, the bundle's priors
    python benchmarks/priors.py runs/polygons --fit flow latent_flow --n 200
    python benchmarks/priors.py runs/polygons --fit latent_flow --set prior.latent=16 --set prior.fit_steps=8000
    python benchmarks/priors.py runs/polygons --fit latent_flow --codes 40000 --memorisation-images 20000  # more codes
    python benchmarks/priors.py runs/polygons --set refine.tv=0.02 --n 200              # another refinement
    python benchmarks/priors.py runs/polygons --sde-noise 0 1                        # ODE against SDE, one prior
    python benchmarks/priors.py runs/polygons --fit latent_flow --set prior.guide_at=0.25 --guidance 1 2  # autoguidance
    python benchmarks/priors.py runs/polygons --extras     # + the autoencoder's ceiling and interpolation midpoints
    python benchmarks/priors.py runs/polygons --priors latent_flow --seed 1 2 3 4   # four draws and their means

Every row is scored against the reference: the first N test images, by Inception pool features
(FID; precision/recall with k=3). The rows made from test images use the next N (N..2N), never the
reference's own: an image scored against a reference that holds its own original finds its twin
among the k nearest neighbours, and a prior's samples have no twin (benchmarks/README.md, "Unpaired").
  real images      test images N..2N as they are: what the data itself scores at this N
  ceiling          test codes N..2N decoded and refined towards all d components (with refine.tv): what a
                   perfect prior gives
  recons refined   test images N..2N reconstructed and refined towards the full S_J x
  ..., paired      the ceiling and reconstructions of the reference's own images, as sessions before the
                   unpaired rows measured them: comparable with their tables, not with a prior's samples
  PRIOR, G / refined   N codes drawn from the prior, decoded by G alone and refined
and with --extras:
  PRIOR projection     (latent_flow) test codes N..2N through the prior's autoencoder, refined: its own ceiling
  interpolation midpoints, path=prior and path=code, between test codes N + i and N + i + 1, refined
These follow each prior as saved (its sde_noise and guidance), whatever --sde-noise and --guidance ask.
With several --seed values each sampler gets a pair of rows per seed, then a row of the refined rows'
means (each score averaged over the draws, not recomputed on their union) with the range of its two ratios.
Each sample row carries its precision as a ratio of the ceiling's, FID as a ratio of the refined
reconstructions', and the memorisation check: the median pixel distance of samples to their
nearest train image over that of the ceiling images (made the same way), and the share of
samples closer to the train set than 99% of the ceiling images are (near-copies); RUN/priors-closest-ROW.png
shows the 16 closest pairs (sample, its nearest train image), ×4, to tell copies from shared backgrounds.
The test split needs 2N images; polygons draw the ones past data.num_test on the fly.

--fit fits priors on the run's train codes (timed) and adds them to the bundle; without it the
bundle's priors are measured. --codes N fits them on the first N train images' codes instead (for
polygons, N may exceed the run's data.num_train: the images are drawn on the fly), and the
memorisation check then compares against those N images (--memorisation-images of them, 5000 by
default: keep the same share of N when comparing fits on different N). --set takes
prior.* (for --fit) and refine.* overrides (for every row, the ceiling's too). Prints the table with the machine; writes RUN/priors.json.

The rows that no prior changes (real images, the ceilings, the refined reconstructions, the reference's features)
are kept in RUN/priors-fixed.pt and reused while everything they depend on is unchanged: the
bundle's generator, whitening and config, the refinement settings that test codes and reconstructions
use (not those of drawn codes only), N, the device, the Inception weights, torch's version and
scatgen's source. A reused row says so; --no-cache recomputes them.
"""

import argparse
import copy
import hashlib
import json
import re
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scatgen  # noqa: E402
from scatgen.bundle import add_prior, find_bundle  # noqa: E402
from scatgen.codes import encode_split  # noqa: E402
from scatgen.config import with_overrides  # noqa: E402
from scatgen.data import load_split  # noqa: E402
from scatgen.evaluation import _stack, _timed as timed, cpu_or_gpu_name, fid_halves  # noqa: E402
from scatgen.inception import compute_features, load_inception  # noqa: E402
from scatgen.metrics import fid_from_features, memorisation_report, precision_recall  # noqa: E402
from scatgen.pictures import to_unit  # noqa: E402
from scatgen.prior import PRIOR_KINDS, FlowPrior, fit_prior  # noqa: E402
from scatgen.utils import atomic_path, cache_key  # noqa: E402

FIXED_FILE = "priors-fixed.pt"
FIXED_ROWS = {"key", "real_feats", "ceiling_images", "rows"}


# Settings that only drawn codes refine with: the fixed rows (test codes, reconstructions) never read them,
# so a sampling variant reuses the cache.
DRAWN_ONLY = ("sample_steps", "sample_tv", "latent_spread")


def fixed_rows_key(run: str, pipe: scatgen.Pipeline, n: int, refine: int | None, inception: str | None) -> str:
    """Names everything the ceiling and reconstruction rows depend on (not the priors)."""
    sums = json.loads((find_bundle(run) / "checksums.json").read_text())
    source = hashlib.sha256()
    for path in sorted(Path(scatgen.__file__).parent.rglob("*.py")):
        source.update(path.read_bytes())
    fixed_refine = {k: v for k, v in asdict(pipe.cfg.refine).items() if k not in DRAWN_ONLY}
    return cache_key({"bundle": {k: v for k, v in sums.items() if not k.startswith("priors/")},
                      "refine": fixed_refine, "steps": refine, "n": n, "inception": inception,
                      "device": str(pipe.device), "layout": "unpaired",
                      "scatgen": source.hexdigest(), "torch": torch.__version__})


def with_data(pipe: scatgen.Pipeline, **changes: int) -> scatgen.Pipeline:
    """A shallow copy of pipe whose data config has `changes`: for polygons, more images drawn on the fly.
    The encoder is copied too: it holds the pipeline's config, which pipe must keep."""
    other = copy.copy(pipe)
    other.encoder = copy.copy(pipe.encoder)
    other.cfg = replace(pipe.cfg, data=replace(pipe.cfg.data, **changes))
    return other


def test_halves(pipe: scatgen.Pipeline, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference (test images 0..n) and the images the ceiling rows are made from (n..2n)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a smaller N is refused below, with the flag that asks for it
        reference, held = fid_halves(pipe, load_split(pipe, "test"), n)
    if len(reference) < n:
        raise SystemExit(f"priors.py scores N={n} images against N test images and makes its ceiling from N "
                         f"others, and the test split has fewer than {2 * n} readable images: pass --n "
                         f"{len(reference)} or less")
    return reference, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=500, help="test images, samples and midpoints per row")
    parser.add_argument("--fit", nargs="*", default=[], choices=PRIOR_KINDS[1:], help="priors to fit first")
    parser.add_argument("--set", action="append", default=[], help="prior.* or refine.* override, e.g. prior.latent=16")
    parser.add_argument("--codes", type=int, default=0, help="fit on the first N train images' codes (0: the run's)")
    parser.add_argument("--priors", nargs="*", help="priors to measure (default: every one in the bundle)")
    parser.add_argument("--extras", action="store_true",
                        help="add the autoencoder's ceiling (latent_flow) and the interpolation midpoint rows")
    parser.add_argument("--no-cache", action="store_true", help=f"recompute the rows kept in RUN/{FIXED_FILE}")
    parser.add_argument("--refine", type=int, default=None, help="refinement steps (default: the bundle's)")
    parser.add_argument("--seed", type=int, nargs="+", default=[1],
                        help="sample seeds: a pair of sample rows per seed and, with several, a row of their means")
    parser.add_argument("--fit-seed", type=int, help="seed of the --fit priors (default: the run's run.seed)")
    parser.add_argument("--sde-noise", type=float, nargs="+", help="flow priors: one pair of sample rows per "
                        "noise (0 = the ODE), the same fitted prior (default: its own prior.sde_noise)")
    parser.add_argument("--guidance", type=float, nargs="+", help="flow priors fitted with a guide (prior.guide_at): "
                        "one pair of sample rows per guidance weight (1 = none), the same fitted prior")
    parser.add_argument("--inception", help="TorchScript FID Inception weights (default: the metrics extra's)")
    parser.add_argument("--memorisation-images", type=int, default=5000,
                        help="train images the memorisation check compares against, a seeded subset of the "
                             "images whose codes the priors were fitted on (--codes N: the first N)")
    args = parser.parse_args()
    start = time.perf_counter()

    pipe = scatgen.load(args.run)
    overrides = dict(s.split("=", 1) for s in args.set)
    fit_seconds, fit_steps = {}, {}
    # The images whose codes the priors are fitted on: the memorisation check compares against them.
    seen = with_data(pipe, num_train=args.codes) if args.codes else pipe
    if args.fit:
        cfg = with_overrides(pipe.cfg, overrides)
        codes = encode_split(seen.cfg, "train", pipe.encoder).codes
        for kind in args.fit:
            tic = time.perf_counter()
            seed = pipe.cfg.run.seed if args.fit_seed is None else args.fit_seed
            prior = fit_prior(codes, replace(cfg.prior, kind=kind), seed=seed, progress=True,
                              eigenvalues=pipe.whitening.eigenvalues.cpu())
            fit_seconds[kind] = time.perf_counter() - tic
            fit_steps[kind] = {stage: f"{n} steps, {prior.step_precision.get(stage, 'float32')}"
                               for stage, n in prior.steps_taken.items()}
            add_prior(args.run, prior)
        pipe = scatgen.load(args.run)
    pipe.cfg = with_overrides(pipe.cfg, {k: v for k, v in overrides.items() if k.startswith("refine.")})
    kinds = args.priors if args.priors is not None else [k for k in pipe.priors if k != "normal"] + ["normal"]

    net = load_inception(args.inception)
    reference, held = test_halves(pipe, args.n)
    n = len(reference)
    test_codes = pipe.encode(held)
    train = _stack(load_split(seen, "train", limit=args.memorisation_images, seed=0), 128)

    def features(images: torch.Tensor) -> torch.Tensor:
        return compute_features(net, to_unit(images))

    out_dir = find_bundle(args.run).parent
    key = fixed_rows_key(args.run, pipe, n, args.refine, args.inception)
    fixed_path = out_dir / FIXED_FILE
    fixed = None
    if not args.no_cache and fixed_path.is_file():
        try:
            fixed = torch.load(fixed_path, weights_only=True)
            if not (isinstance(fixed, dict) and "key" in fixed):
                raise ValueError("not a priors.py cache")
        except Exception as e:  # a damaged cache is only a slower run
            print(f"{fixed_path} is unreadable ({type(e).__name__}): recomputing its rows")
            fixed = None
        if fixed is not None and (fixed["key"] != key or not FIXED_ROWS <= set(fixed)):
            print(f"{fixed_path} was made for another bundle, refinement, N, device, Inception, scatgen source or "
                  f"version of this script: recomputing its rows")
            fixed = None
    real_feats = fixed["real_feats"] if fixed else features(reference)
    rows: list[dict] = []

    def measure(name: str, images: torch.Tensor, seconds: float, ceiling: dict | None = None,
                recons: dict | None = None, same_way: torch.Tensor | None = None) -> dict:
        feats = features(images)
        row = {"row": name, "n": len(images), "seconds": seconds, "fid": fid_from_features(real_feats, feats),
               **precision_recall(real_feats, feats, k=3)}
        if ceiling is not None:
            row["precision_vs_ceiling"] = row["precision"] / max(ceiling["precision"], 1e-12)
        if recons is not None:
            row["fid_vs_recons"] = row["fid"] / recons["fid"]
        if same_way is not None:
            memo = memorisation_report(to_unit(images), to_unit(same_way), to_unit(train))
            row["memorisation_ratio"] = memo["ratio_median"]
            row["near_copies"] = memo["frac_possible_copies"]
            # The pairs the check ranks closest, to look at: copies, or only a shared background?
            pairs = torch.stack([torch.stack([images[i], train[j]]) for i, j in
                                 zip(memo["closest_sample_indices"], memo["closest_train_indices"])]).flatten(0, 1)
            slug = re.sub(r"[^A-Za-z0-9_]+", "-", name).strip("-")
            picture = out_dir / f"priors-closest-{slug}.png"
            save_image(F.interpolate(to_unit(pairs), scale_factor=4), picture, nrow=8, padding=2)
            row["closest_pairs"] = str(picture)
        rows.append(row)
        print(format_row(row), flush=True)
        return row

    # Drawn codes (samples, the autoencoder's outputs, midpoints) refine as Pipeline.sample does
    # (refine.sample_steps, sample_tv, along the prior's surface); test codes with refine.tv, and
    # reconstructions with none.
    drawn_tv = pipe.cfg.refine.sample_tv
    if fixed:
        ceiling_images = fixed["ceiling_images"]
        for row in fixed["rows"]:
            row["reused"] = True
            rows.append(row)
            print(format_row(row), flush=True)
        ceiling, recons = rows[0], rows[1]
    else:
        ceiling_images, seconds = timed(pipe.decode, test_codes, refine=args.refine)
        ceiling = measure("ceiling: test codes, refined", ceiling_images, seconds)
        recons_images, seconds = timed(pipe.reconstruct, held, refine=args.refine)
        recons = measure("test reconstructions, refined", recons_images, seconds, ceiling)
        measure("real images (test N..2N)", held, 0.0, ceiling, recons)
        # The measure of sessions before the unpaired rows: each image's original is in the reference.
        paired, seconds = timed(pipe.decode, pipe.encode(reference), refine=args.refine)
        measure("ceiling, paired (the reference's own test codes), refined", paired, seconds, ceiling, recons)
        paired, seconds = timed(pipe.reconstruct, reference, refine=args.refine)
        measure("test reconstructions, paired (the reference's own), refined", paired, seconds, ceiling, recons)
        with atomic_path(fixed_path) as tmp:
            torch.save({"key": key, "real_feats": real_feats, "ceiling_images": ceiling_images,
                        "rows": [dict(row) for row in rows]}, tmp)
    ceiling_by_g = pipe.decode(test_codes, refine=0)  # the G-alone rows' memorisation reference
    settings = {k: pipe.priors[k].settings() for k in kinds}  # as saved, before --sde-noise or --guidance overrides
    for kind in kinds:
        prior = pipe.priors[kind]
        flow = isinstance(prior, FlowPrior)
        samplers = [(noise, weight) for noise in (args.sde_noise if args.sde_noise and flow else [None])
                    for weight in (args.guidance if args.guidance and flow else [None])]
        for noise, weight in samplers:
            sampler = []
            if noise is not None:
                prior.sde_noise = noise
                sampler.append(f"sde_noise {noise:g}")
            if weight is not None:
                prior.guidance = weight  # a prior fitted without a guide says so here
                sampler.append(f"guidance {weight:g}")
            label = f"{kind} ({', '.join(sampler)})" if sampler else kind
            draws = []
            for seed in args.seed:
                drawn = f"{label}, seed {seed}" if len(args.seed) > 1 else label
                codes, seconds = timed(pipe.random_codes, n, seed=seed, prior=kind)
                raw, more = timed(pipe.decode, codes, refine=0)
                measure(f"{drawn}, G", raw, seconds + more, ceiling, recons, ceiling_by_g)
                refined, more = timed(pipe.decode, codes, refine=args.refine, dims=prior.dims, drawn_by=kind)
                draws.append(measure(f"{drawn}, refined", refined, seconds + more, ceiling, recons, ceiling_images))
            if len(draws) > 1:
                rows.append(mean_row(f"{label}, refined, mean of {len(draws)} seeds", draws))
                print(format_row(rows[-1]), flush=True)
        if flow:  # the rows below follow the prior as saved
            prior.sde_noise, prior.guidance = settings[kind]["sde_noise"], settings[kind].get("guidance", 1.0)
        if args.extras and prior.kind == "latent_flow":
            projected, seconds = timed(pipe.decode, prior.project(test_codes), refine=args.refine, drawn_by=kind)
            measure(f"{kind}, test codes through its autoencoder, refined", projected, seconds, ceiling, recons)
    if args.extras:
        # Midpoints between test codes i and i + 1; the ends are the ceiling's images.
        a, b = test_codes, test_codes.roll(-1, 0)
        paths = ["code"] + (["prior"] if pipe.priors[pipe.default_prior].invertible else [])
        for path in paths:
            mids, seconds = timed(pipe.interpolate_codes, a, b, torch.tensor([0.5]), path=path)
            images, more = timed(pipe.decode, mids[:, 0], refine=args.refine, drawn_by=pipe.default_prior)
            measure(f"interpolation midpoints, path={path} ({pipe.default_prior}), refined", images, seconds + more,
                    ceiling, recons)

    report = {"run": args.run, "n": n, "machine": cpu_or_gpu_name(pipe.device), "fit_seconds": fit_seconds,
              "fit_steps": fit_steps, "settings": settings, "rows": rows,
              "refine_steps": pipe.refine_settings(args.refine).steps,
              "drawn_refine_steps": pipe.refine_settings(args.refine, drawn=True).steps,
              "overrides": overrides, "codes": args.codes or None, "seconds": time.perf_counter() - start}
    (out_dir / "priors.json").write_text(json.dumps(report, indent=2))
    print(f"\nmachine: {report['machine']}; N={n}, Inception k=3; refine {report['refine_steps']} steps, and for "
          f"drawn codes {report['drawn_refine_steps']} with sample_tv {drawn_tv:g} and latent_spread "
          f"{pipe.cfg.refine.latent_spread:g}; "
          f"fit seconds {json.dumps({k: round(v) for k, v in fit_seconds.items()})}"
          + (f" ({json.dumps(fit_steps)})" if fit_steps else "") + f"; total {report['seconds']:.0f} s")
    print(markdown(rows))


def mean_row(name: str, draws: list[dict]) -> dict:
    """The mean of each score over draws of one sampler, with the range of the ratios the targets
    read: one draw at N = 500 moves FID by several points (benchmarks/README.md)."""
    keys = ("precision", "recall", "fid", "precision_vs_ceiling", "fid_vs_recons", "memorisation_ratio", "near_copies")
    row = {"row": name, "n": sum(d["n"] for d in draws), "seconds": sum(d["seconds"] for d in draws),
           **{k: sum(d[k] for d in draws) / len(draws) for k in keys}}
    for k in ("precision_vs_ceiling", "fid_vs_recons"):
        row[f"{k}_range"] = [min(d[k] for d in draws), max(d[k] for d in draws)]
    return row


def format_row(row: dict) -> str:
    extra = ", ".join(f"{k} {row[k]:.3g}" for k in ("precision_vs_ceiling", "fid_vs_recons", "memorisation_ratio",
                                                     "near_copies") if k in row)
    spread = ", ".join(f"{k} {row[k + '_range'][0]:.3g}–{row[k + '_range'][1]:.3g}"
                       for k in ("precision_vs_ceiling", "fid_vs_recons") if k + "_range" in row)
    return (f"{row['row']}: precision {row['precision']:.3f}, recall {row['recall']:.3f}, FID {row['fid']:.1f}"
            f"{', ' + extra if extra else ''}{' (ranges: ' + spread + ')' if spread else ''} "
            f"({row['seconds']:.0f} s{', reused' if row.get('reused') else ''})")


def markdown(rows: list[dict]) -> str:
    def cell(row: dict, key: str, fmt: str) -> str:
        if key not in row:
            return "–"
        spread = row.get(f"{key}_range")  # a mean over seeds
        return format(row[key], fmt) + (f" ({spread[0]:{fmt}}–{spread[1]:{fmt}})" if spread else "")

    lines = ["| images | precision | × ceiling | recall | FID | × recons FID | memorisation ratio | near-copies | s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['precision']:.3f} | {cell(r, 'precision_vs_ceiling', '.2f')} | "
                     f"{r['recall']:.3f} | {r['fid']:.1f} | {cell(r, 'fid_vs_recons', '.2f')} | "
                     f"{cell(r, 'memorisation_ratio', '.2f')} | {cell(r, 'near_copies', '.1%')} | "
                     f"{r['seconds']:.0f}{' (reused)' if r.get('reused') else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
