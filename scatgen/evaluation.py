"""The numbers a trained model is judged by (see the README's "Evaluate" section).

Reconstruction PSNR/SSIM on train and test, code statistics, the cycle error,
FID/KID of samples and of reconstructions, and the memorisation check. Every mean
is over images, never over batch means.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from scatgen.data import build_dataset, collate_skip_none
from scatgen.metrics import (
    InceptionUnavailable, RunningMean, code_statistics, compute_features, fid_from_features,
    kernel_inception_distance, load_inception, memorisation_report, psnr, ssim,
)
from scatgen.pictures import to_unit
from scatgen.pipeline import Pipeline
from scatgen.utils import atomic_path, progress_bar


def load_split(pipe: Pipeline, split: str, limit: int = 0, seed: int = 0, data_root: str | None = None) -> Dataset:
    """The bundle's dataset split; a seeded random subset of `limit` images if limit > 0."""
    data_cfg = pipe.cfg.data
    if data_root:
        from dataclasses import replace

        data_cfg = replace(data_cfg, root=data_root)
    dataset = build_dataset(data_cfg, split)
    if 0 < limit < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
        dataset = Subset(dataset, sorted(order.tolist()))
    return dataset


def iterate_images(dataset: Dataset, batch_size: int, desc: str = "", progress: bool = False):
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_skip_none)
    for batch in progress_bar(loader, desc=desc, disable=not progress, leave=False):
        if batch is not None:
            yield batch


@torch.no_grad()
def reconstruction_metrics(pipe: Pipeline, dataset: Dataset, batch_size: int = 128, desc: str = "",
                           progress: bool = False, keep_images: bool = False) -> dict[str, Any]:
    """Mean PSNR (dB) and SSIM of G(L S_J x) against x over every readable image, in [0, 1].

    Also returns the codes and per-image values; the images and recons with keep_images."""
    psnr_mean, ssim_mean = RunningMean(skip_nonfinite=True), RunningMean()
    out: dict[str, list] = {"codes": [], "psnr_per_image": [], "ssim_per_image": [], "images": [], "recons": []}
    for images in iterate_images(dataset, batch_size, desc, progress):
        z = pipe.encode(images)
        recons = pipe.decode(z)
        p, s = psnr(to_unit(recons), to_unit(images)), ssim(to_unit(recons), to_unit(images))
        psnr_mean.update(p)
        ssim_mean.update(s)
        out["codes"].append(z)
        out["psnr_per_image"].append(p)
        out["ssim_per_image"].append(s)
        if keep_images:
            out["images"].append(images)
            out["recons"].append(recons)
    if ssim_mean.count == 0:
        raise ValueError("no readable images to reconstruct")
    result: dict[str, Any] = {"psnr": psnr_mean.mean, "ssim": ssim_mean.mean, "n": ssim_mean.count,
                              "perfect": psnr_mean.n_skipped}
    result.update({k: torch.cat(v) for k, v in out.items() if v})
    return result


@torch.no_grad()
def cycle_error(pipe: Pipeline, n: int = 500, seed: int = 0) -> float:
    """Mean over z ~ N(0, I) of ‖L S_J G(z) − z‖ / ‖z‖."""
    z = pipe.random_codes(n, seed=seed)
    z_back = pipe.encode(pipe.decode(z))
    return ((z_back - z).norm(dim=1) / z.norm(dim=1)).mean().item()


def _stack(dataset: Dataset, batch_size: int) -> torch.Tensor:
    return torch.cat(list(iterate_images(dataset, batch_size)))


def evaluate(pipe: Pipeline, num_train: int = 2000, num_fid: int = 1000, num_memorisation: int = 300,
             inception: str | None = None, seed: int = 0, batch_size: int = 128, data_root: str | None = None,
             progress: bool = True, feature_net: torch.nn.Module | None = None) -> dict[str, Any]:
    """Everything in the evaluation protocol, as a JSON-serialisable dict."""
    start = time.time()
    report: dict[str, Any] = {"image_size": pipe.image_size, "J": pipe.cfg.encoder.J, "L": pipe.cfg.encoder.L,
                              "d": pipe.d, "generator": pipe.cfg.generator.kind, "dataset": pipe.cfg.data.name,
                              "num_parameters": sum(p.numel() for p in pipe.generator.parameters())}
    test_set = load_split(pipe, "test", data_root=data_root)
    train_set = load_split(pipe, "train", limit=num_train, seed=seed, data_root=data_root)
    for split, dataset in (("test", test_set), ("train", train_set)):
        rec = reconstruction_metrics(pipe, dataset, batch_size, f"reconstructing {split}", progress)
        codes = rec.pop("codes")
        report[f"{split}_reconstruction"] = {k: v for k, v in rec.items() if not isinstance(v, torch.Tensor)}
        if split == "test":
            report["test_codes"] = code_statistics(codes)
    report["reconstruction_gap_psnr"] = report["train_reconstruction"]["psnr"] - report["test_reconstruction"]["psnr"]
    report["cycle_error"] = cycle_error(pipe, n=min(num_fid, 500), seed=seed)

    test_images = _stack(test_set, batch_size)
    n_fid = min(num_fid, len(test_images))
    real = test_images[:n_fid]
    samples = pipe.sample(n_fid, seed=seed + 1)
    recons = pipe.reconstruct(real)
    try:
        net = feature_net if feature_net is not None else load_inception(inception)
        feats = {name: compute_features(net, to_unit(x), batch_size=64)
                 for name, x in progress_bar((("real", real), ("samples", samples), ("recons", recons)),
                                     desc="inception features", disable=not progress, leave=False)}
        kid = {k: kernel_inception_distance(feats["real"], feats[k], subset_size=min(1000, n_fid)) for k in
               ("samples", "recons")}
        report["fid"] = {
            "samples": fid_from_features(feats["real"], feats["samples"]),
            "reconstructions": fid_from_features(feats["real"], feats["recons"]),
            "kid_samples": kid["samples"][0], "kid_samples_std": kid["samples"][1],
            "kid_reconstructions": kid["recons"][0], "kid_reconstructions_std": kid["recons"][1],
            "n": n_fid, "reference": "test split", "image_size": pipe.image_size,
            "resize": getattr(net, "resize_method", "none (stand-in feature network)"),
            "network": "FID Inception (TorchScript, 2048-d pool3)" if feature_net is None else type(net).__name__,
        }
        report["fid"]["sample_to_reconstruction_ratio"] = report["fid"]["samples"] / max(
            report["fid"]["reconstructions"], 1e-12)
    except InceptionUnavailable as e:
        report["fid"] = {"skipped": str(e)}

    m = min(num_memorisation, n_fid)
    train_images = _stack(load_split(pipe, "train", limit=max(num_train, 5000), seed=seed, data_root=data_root),
                          batch_size)
    mem = memorisation_report(to_unit(samples[:m]), to_unit(test_images[:m]), to_unit(train_images))
    report["memorisation"] = {k: v for k, v in mem.items() if not isinstance(v, list)}
    report["seconds"] = time.time() - start
    return report


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def markdown_table(report: dict[str, Any]) -> str:
    """A short table of the headline numbers."""
    tr, te = report["train_reconstruction"], report["test_reconstruction"]
    rows = [
        ("test PSNR / SSIM", f"{te['psnr']:.2f} dB / {te['ssim']:.4f} (n={te['n']})"),
        ("train PSNR / SSIM", f"{tr['psnr']:.2f} dB / {tr['ssim']:.4f} (n={tr['n']})"),
        ("train − test PSNR gap", f"{report['reconstruction_gap_psnr']:.2f} dB"),
        ("test codes: ‖mean‖, ‖Σ−I‖_F/√d, excess kurtosis",
         ", ".join(_fmt(report["test_codes"][k]) for k in list(report["test_codes"])[:3])),
        ("cycle error ‖L S G(z) − z‖/‖z‖", _fmt(report["cycle_error"])),
    ]
    fid = report["fid"]
    if "skipped" in fid:
        rows.append(("FID / KID", fid["skipped"]))
    else:
        rows += [
            ("FID samples / reconstructions", f"{fid['samples']:.2f} / {fid['reconstructions']:.2f} "
                                              f"(ratio {fid['sample_to_reconstruction_ratio']:.2f})"),
            ("KID samples / reconstructions", f"{fid['kid_samples']:.4f} / {fid['kid_reconstructions']:.4f}"),
            ("FID setting", f"N={fid['n']} vs {fid['reference']}, {fid['image_size']}² → 299² bilinear"),
        ]
    mem = report["memorisation"]
    rows.append(("memorisation: NN distance samples / test (median)",
                 f"{mem['sample_nn_median']:.3f} / {mem['test_nn_median']:.3f} (ratio {mem['ratio_median']:.2f}, "
                 f"possible copies {mem['frac_possible_copies']:.1%})"))
    lines = ["| metric | value |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "evaluation.json", out_dir / "evaluation.md"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=float))
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown_table(report))
    return json_path, md_path
