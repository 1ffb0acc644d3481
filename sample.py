"""Use a trained model: sample, interpolate, reconstruct, evaluate, atoms.

    python sample.py sample runs/polygons --n 64 --seed 0 --temperature 0.8
    python sample.py interpolate runs/polygons --a test:0 --b test:1 --steps 10 --spherical
    python sample.py interpolate runs/polygons --a seed:1 --b seed:2
    python sample.py reconstruct runs/polygons --split test --n 32
    python sample.py reconstruct runs/polygons --images a.png b.jpg    (or --folder DIR)
    python sample.py evaluate runs/polygons --inception /path/to/inception.pt
    python sample.py atoms runs/polygons-sparse                          (sparse_deconv generators)

RUN is a run directory or its model/ bundle. Pictures go to RUN/samples/ unless --out says otherwise.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

import scatgen
from scatgen.data import load_image
from scatgen.evaluation import evaluate, load_split, markdown_table, reconstruction_metrics, write_report
from scatgen.pictures import grid, pairs_grid, save_gif, save_png, to_pil, to_unit


def out_dir(args) -> Path:
    run = Path(args.run)
    base = run.parent if (run / "bundle.json").is_file() else run
    path = Path(args.out) if args.out else base / "samples"
    path.mkdir(parents=True, exist_ok=True)
    return path


def user_image(path: str | Path, size: int) -> torch.Tensor:
    """A user's image file; one of another size is centre-cropped and resized, with a notice."""
    image = load_image(path, size)
    with Image.open(path) as im:
        if im.size != (size, size):
            print(f"notice: {path} is {im.size[0]}×{im.size[1]}; centre-cropped and resized to {size}×{size}",
                  file=sys.stderr)
    return image


def dataset_image(pipe, spec: str, data_root: str | None) -> torch.Tensor:
    split, _, index = spec.partition(":")
    dataset = load_split(pipe, split, data_root=data_root)
    i = int(index)
    if not 0 <= i < len(dataset):
        raise ValueError(f"'{spec}': index {i} is out of range; the {split} split has {len(dataset)} images")
    image = dataset[i]
    if image is None:
        raise ValueError(f"'{spec}': that image is unreadable")
    return image


def endpoint(pipe, spec: str, data_root: str | None) -> torch.Tensor:
    """'seed:K' → a noise code; 'train:I' / 'test:I' → a dataset image; anything else → an image file."""
    if spec.startswith("seed:"):
        return pipe.random_codes(1, seed=int(spec[5:]))[0]
    if spec.startswith(("train:", "test:")):
        return dataset_image(pipe, spec, data_root)
    return user_image(spec, pipe.image_size)


def cmd_sample(pipe, args) -> None:
    samples = pipe.sample(args.n, seed=args.seed, temperature=args.temperature)
    out = out_dir(args)
    path = save_png(grid(samples, nrow=args.nrow), out / f"samples-seed{args.seed}-t{args.temperature:g}.png")
    if args.individual:
        for i, image in enumerate(samples):
            to_pil(to_unit(image)).save(out / f"sample-{args.seed}-{i:04d}.png")
    print(f"wrote {path}")


def cmd_interpolate(pipe, args) -> None:
    a, b = (endpoint(pipe, s, args.data_root) for s in (args.a, args.b))
    path_images = pipe.interpolate(a, b, steps=args.steps, spherical=args.spherical)
    out = out_dir(args)
    stem = f"interpolation-{args.a}-{args.b}".replace(":", "").replace("/", "_")[:80]
    save_png(grid(path_images, nrow=args.steps), out / f"{stem}.png")
    save_gif(path_images, out / f"{stem}.gif", scale=max(1, 128 // pipe.image_size))
    print(f"wrote {out / stem}.png and .gif")


def cmd_reconstruct(pipe, args) -> None:
    if args.images or args.folder:
        paths = [Path(p) for p in args.images or []]
        if args.folder:
            folder = Path(args.folder)
            if not folder.is_dir():
                raise FileNotFoundError(f"--folder '{folder}' is not a directory")
            paths += sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not paths:
            raise ValueError("no images to reconstruct: pass --images FILES, --folder DIR or --split")
        dataset = [user_image(p, pipe.image_size) for p in paths[:args.n]]
        names = [str(p) for p in paths[:args.n]]
    else:
        dataset = load_split(pipe, args.split, data_root=args.data_root)
        dataset = torch.utils.data.Subset(dataset, range(min(args.n, len(dataset))))
        names = [f"{args.split}:{i}" for i in range(len(dataset))]
    metrics = reconstruction_metrics(pipe, dataset, keep_images=True)
    per_image = [{"image": n, "psnr": p, "ssim": s} for n, p, s in
                 zip(names, metrics.pop("psnr_per_image").tolist(), metrics.pop("ssim_per_image").tolist())]
    images, recons = metrics.pop("images"), metrics.pop("recons")
    metrics.pop("codes")
    out = out_dir(args)
    save_png(pairs_grid(images, recons, nrow=args.nrow), out / "reconstructions.png")
    (out / "reconstructions.json").write_text(json.dumps({"mean": metrics, "images": per_image}, indent=2))
    for row in per_image:
        print(f"{row['image']}: PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.4f}")
    print(f"mean over {metrics['n']}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}")
    print(f"wrote {out / 'reconstructions.png'}")


def cmd_evaluate(pipe, args) -> None:
    report = evaluate(pipe, num_train=args.num_train, num_fid=args.num_fid, inception=args.inception,
                      seed=args.seed, data_root=args.data_root)
    run = Path(args.run)
    target = Path(args.out) if args.out else (run.parent if (run / "bundle.json").is_file() else run)
    json_path, md_path = write_report(report, target)
    print(markdown_table(report))
    print(f"wrote {json_path} and {md_path} ({report['seconds']:.0f} s)")


def cmd_atoms(pipe, args) -> None:
    from scatgen.generators.sparse_deconv import atoms_report

    report = atoms_report(pipe, out_dir(args), data_root=args.data_root)
    print(json.dumps(report, indent=2))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {"sample": cmd_sample, "interpolate": cmd_interpolate, "reconstruct": cmd_reconstruct,
                "evaluate": cmd_evaluate, "atoms": cmd_atoms}
    parsers = {name: sub.add_parser(name) for name in commands}
    for p in parsers.values():
        p.add_argument("run", help="run directory or model bundle")
        p.add_argument("--out", help="output folder")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--data-root", help="dataset root, if it moved since training")
    parsers["sample"].add_argument("--n", type=int, default=64)
    parsers["sample"].add_argument("--temperature", type=float, default=1.0)
    parsers["sample"].add_argument("--individual", action="store_true", help="also write one PNG per sample")
    parsers["sample"].add_argument("--nrow", type=int, default=8)
    parsers["interpolate"].add_argument("--a", required=True, help="image path, train:I, test:I or seed:K")
    parsers["interpolate"].add_argument("--b", required=True, help="image path, train:I, test:I or seed:K")
    parsers["interpolate"].add_argument("--steps", type=int, default=10)
    parsers["interpolate"].add_argument("--spherical", action="store_true")
    parsers["reconstruct"].add_argument("--images", nargs="+")
    parsers["reconstruct"].add_argument("--folder")
    parsers["reconstruct"].add_argument("--split", default="test", choices=["train", "test"])
    parsers["reconstruct"].add_argument("--n", type=int, default=32)
    parsers["reconstruct"].add_argument("--nrow", type=int, default=8)
    parsers["evaluate"].add_argument("--inception", help="TorchScript FID Inception weights")
    parsers["evaluate"].add_argument("--num-fid", type=int, default=1000, help="N for FID/KID")
    parsers["evaluate"].add_argument("--num-train", type=int, default=2000, help="train images for PSNR")
    args = parser.parse_args(argv)
    try:
        pipe = scatgen.load(args.run, device=args.device)
        commands[args.command](pipe, args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
