"""The numbers a trained model is judged by (see the README's "Evaluate" section).

Reconstruction PSNR/SSIM on train and test, code statistics, the cycle error,
FID/KID of samples and of reconstructions, and the memorisation check. Every mean
is over images, never over batch means.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from scatgen.data import build_dataset, iterate_images, load_split
from scatgen.inception import InceptionUnavailable, compute_features, load_inception
from scatgen.metrics import (
    RunningMean, code_statistics, fid_from_features, finite_mean, kernel_inception_distance, memorisation_report,
    precision_recall, psnr, ssim,
)
from scatgen.pictures import to_unit
from scatgen.pipeline import Pipeline
from scatgen.refinement import refine_decodings, refine_reconstructions
from scatgen.utils import atomic_path, progress_bar


def reconstruction_metrics(pipe: Pipeline, dataset: Dataset, batch_size: int = 128, desc: str = "",
                           progress: bool = False, keep_images: bool = False, refine: int = 0) -> dict[str, Any]:
    """Mean PSNR (dB) and SSIM against x over every readable image, in [0, 1], of G(L S_J x)
    ("raw") and, when refine > 0, of its refinement towards S_J x ("refined").

    Also returns the codes and per-image values; the images and recons with keep_images."""
    kinds = ["raw"] + (["refined"] if refine > 0 else [])
    means = {k: (RunningMean(skip_nonfinite=True), RunningMean()) for k in kinds}
    per: dict[str, dict[str, list]] = {k: {"psnr_per_image": [], "ssim_per_image": [], "recons": []} for k in kinds}
    codes, kept = [], []
    for images in iterate_images(dataset, batch_size, desc, progress):
        z = pipe.encode(images)
        recons = {"raw": pipe.decode(z, refine=0)}
        if refine > 0:
            recons["refined"] = refine_reconstructions(pipe.scattering, recons["raw"], images,
                                                       pipe.refine_settings(refine))
        for kind, x in recons.items():
            p, s = psnr(to_unit(x), to_unit(images)), ssim(to_unit(x), to_unit(images))
            means[kind][0].update(p)
            means[kind][1].update(s)
            per[kind]["psnr_per_image"].append(p)
            per[kind]["ssim_per_image"].append(s)
            if keep_images:
                per[kind]["recons"].append(x)
        codes.append(z)
        if keep_images:
            kept.append(images)
    if not codes:
        raise ValueError("no readable images to reconstruct")
    result: dict[str, Any] = {"codes": torch.cat(codes)}
    if keep_images:
        result["images"] = torch.cat(kept)
    for kind in kinds:
        psnr_mean, ssim_mean = means[kind]
        result[kind] = {"psnr": psnr_mean.mean, "ssim": ssim_mean.mean, "n": ssim_mean.count,
                        "perfect": psnr_mean.n_skipped}
        result[kind].update({k: torch.cat(v) for k, v in per[kind].items() if v})
    return result


def cycle_errors(pipe: Pipeline, codes: torch.Tensor, images: torch.Tensor) -> float:
    """Mean of ‖L S_J x − z‖ / ‖z‖ for images x decoded from codes z."""
    return ((pipe.encode(images) - codes).norm(dim=1) / codes.norm(dim=1)).mean().item()


def _stack(dataset: Dataset, batch_size: int) -> torch.Tensor:
    return torch.cat(list(iterate_images(dataset, batch_size)))


def fid_halves(pipe: Pipeline, test_set: Dataset, num_fid: int, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The FID reference, the first N test images, and the N after them, which are reconstructed.

    Polygons are procedural and test image i is the same whatever the split's length, so their
    split grows to 2·num_fid. Other data give N = half their readable test images at most, with a
    warning when that is below num_fid."""
    if pipe.cfg.data.name == "polygons" and len(test_set) < 2 * num_fid:
        test_set = build_dataset(replace(pipe.cfg.data, num_test=2 * num_fid), "test")
    images = _stack(test_set, batch_size)
    n = min(num_fid, len(images) // 2)
    if n < 1:
        raise ValueError(f"FID needs at least 2 readable test images (half the reference, half reconstructed), "
                         f"and the test split has {len(images)}")
    if n < num_fid:
        warnings.warn(f"FID at N={n}, not {num_fid}: the test split has {len(images)} readable images, and FID "
                      f"takes N of them as its reference and reconstructs N others; pass --num-fid {n} to ask "
                      f"for that N, since a larger one needs a larger test split", stacklevel=2)
    return images[:n], images[n:2 * n]


def cpu_or_gpu_name(device: torch.device) -> str:
    """The processor that timings were taken on, for the report."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} torch threads"
    except OSError:
        pass
    return f"CPU, {torch.get_num_threads()} torch threads"


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    tic = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - tic


def evaluate(pipe: Pipeline, num_train: int = 2000, num_fid: int = 1000, num_memorisation: int = 300,
             inception: str | None = None, seed: int = 0, batch_size: int = 128, data_root: str | None = None,
             progress: bool = True, feature_net: torch.nn.Module | None = None, refine: int | None = None,
             priors: list[str] | None = None) -> dict[str, Any]:
    """Everything in the evaluation protocol, as a JSON-serialisable dict.

    Raw G and refined (`refine` steps; None = the bundle's) side by side, for the
    reconstructions and for samples of every prior in `priors` (None = all the bundle holds)."""
    start = time.time()
    refine_cfg = pipe.refine_settings(refine)
    drawn_cfg = pipe.refine_settings(refine, drawn=True)  # steps and TV of codes a prior drew
    # The Inception network first: a wrong path must fail before minutes of reconstruction.
    try:
        net = feature_net if feature_net is not None else load_inception(inception)
    except InceptionUnavailable as e:
        net, skipped = None, str(e)
    priors = list(pipe.priors) if priors is None else priors
    if not priors:
        raise ValueError("evaluate needs at least one prior to sample from, e.g. priors=['normal']")
    for kind in priors:
        pipe.prior(kind)  # refuses, before any work, a kind the bundle does not hold
    report: dict[str, Any] = {"image_size": pipe.image_size, "J": pipe.cfg.encoder.J, "L": pipe.cfg.encoder.L,
                              "d": pipe.d, "generator": pipe.cfg.generator.kind, "dataset": pipe.cfg.data.name,
                              "num_parameters": sum(p.numel() for p in pipe.generator.parameters())}
    test_set = load_split(pipe, "test", data_root=data_root)
    train_set = load_split(pipe, "train", limit=num_train, seed=seed, data_root=data_root)
    for split, dataset in (("test", test_set), ("train", train_set)):
        rec = reconstruction_metrics(pipe, dataset, batch_size, f"reconstructing {split}", progress)
        codes = rec["codes"]
        report[f"{split}_reconstruction"] = {k: v for k, v in rec["raw"].items() if not isinstance(v, torch.Tensor)}
        if split == "test":
            report["test_codes"] = code_statistics(codes)
    report["reconstruction_gap_psnr"] = report["train_reconstruction"]["psnr"] - report["test_reconstruction"]["psnr"]

    # Every FID row below is at equal N against the reference, the first n test images. The
    # reconstructions are of the next n: scored against a reference that holds its own original, an
    # image finds that twin among its nearest features, and a prior's samples have none
    # (benchmarks/README.md, "Unpaired").
    reference, originals = fid_halves(pipe, test_set, num_fid, batch_size)
    n = len(reference)
    recons = {"raw": pipe.reconstruct(originals, refine=0)}
    samples: dict[str, dict[str, torch.Tensor]] = {}
    sample_codes: dict[str, torch.Tensor] = {}
    seconds = {"reconstruct": 0.0, "decode": 0.0}
    if refine_cfg.steps > 0:
        recons["refined"], seconds["reconstruct"] = _timed(
            refine_reconstructions, pipe.scattering, recons["raw"], originals, refine_cfg)
    for kind in progress_bar(priors, desc="sampling and refining", disable=not progress, leave=False):
        codes = sample_codes[kind] = pipe.random_codes(n, seed=seed + 1, prior=kind)
        samples[kind] = {"raw": pipe.decode(codes, refine=0)}
        if drawn_cfg.steps > 0:
            samples[kind]["refined"], spent = _timed(refine_decodings, pipe.encoder, samples[kind]["raw"], codes,
                                                     drawn_cfg, pipe.priors[kind].dims, pipe.priors[kind])
            seconds["decode"] += spent
    for kind, images in recons.items():
        p, s = psnr(to_unit(images), to_unit(originals)), ssim(to_unit(images), to_unit(originals))
        report[f"test_reconstruction_{kind}_fid_images"] = {"psnr": finite_mean(p), "ssim": s.mean().item(),
                                                            "n": n, "images": f"test images {n}..{2 * n}"}
    cycle_prior = "normal" if "normal" in samples else priors[0]
    report["cycle_error"] = {kind: cycle_errors(pipe, sample_codes[cycle_prior], images)
                             for kind, images in samples[cycle_prior].items()}
    report["cycle_error"]["prior"] = cycle_prior
    report["refinement"] = {
        "steps": refine_cfg.steps, "optimizer": refine_cfg.optimizer, "lr": refine_cfg.lr,
        "weighting": refine_cfg.weighting, "anchor": refine_cfg.anchor, "tv": refine_cfg.tv,
        "sample_steps": drawn_cfg.steps, "sample_tv": refine_cfg.sample_tv, "latent_spread": refine_cfg.latent_spread,
        "seconds_per_64_reconstructions": 64 * seconds["reconstruct"] / n,
        "seconds_per_64_samples": 64 * seconds["decode"] / (n * len(priors)),
        "device": cpu_or_gpu_name(pipe.device),
    }

    if net is None:
        report["fid"] = {"skipped": skipped}
    else:
        def features(images: torch.Tensor) -> torch.Tensor:
            return compute_features(net, to_unit(images))

        def scores(real_feats: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
            feats = features(images)
            kid, kid_std = kernel_inception_distance(real_feats, feats, subset_size=min(1000, n))
            return {"fid": fid_from_features(real_feats, feats), "kid": kid, "kid_std": kid_std,
                    **precision_recall(real_feats, feats, k=3)}

        real_feats = features(reference)
        report["fid"] = {
            "n": n, "reference": f"test images 0..{n}; reconstructions of test images {n}..{2 * n}",
            "image_size": pipe.image_size,
            "resize": getattr(net, "resize_method", "none (stand-in feature network)"),
            "network": "FID Inception (TorchScript, 2048-d pool3)" if feature_net is None else type(net).__name__,
            # What the data itself scores at this N: FID's floor, and the precision a sampler can hope for.
            "real_images": scores(real_feats, originals),
            "reconstructions": {kind: scores(real_feats, images) for kind, images in recons.items()},
            "samples": {prior: {kind: scores(real_feats, images) for kind, images in sets.items()}
                        for prior, sets in progress_bar(samples.items(), desc="inception features",
                                                        disable=not progress, leave=False)},
        }

    m = min(num_memorisation, n)
    train_images = _stack(load_split(pipe, "train", limit=max(num_train, 5000), seed=seed, data_root=data_root),
                          batch_size)
    # A sample is judged against a test reconstruction made the same way (raw or refined):
    # both went through G, so a ratio near 1 means the prior adds no copying of its own.
    report["memorisation"] = {
        prior: {kind: {k: v for k, v in memorisation_report(to_unit(images[:m]), to_unit(recons[kind][:m]),
                                                             to_unit(train_images)).items()
                       if not isinstance(v, list)}
                for kind, images in sets.items() if kind in recons}  # (refine.steps 0, sample_steps > 0)
        for prior, sets in samples.items()}
    report["seconds"] = time.time() - start
    return report


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def markdown_table(report: dict[str, Any]) -> str:
    """The headline numbers: raw G and refined side by side, one row per prior."""
    tr, te = report["train_reconstruction"], report["test_reconstruction"]
    ref = report["refinement"]
    rows = [
        ("test PSNR / SSIM, G", f"{te['psnr']:.2f} dB / {te['ssim']:.4f} (n={te['n']})"),
        ("train PSNR / SSIM, G", f"{tr['psnr']:.2f} dB / {tr['ssim']:.4f} (n={tr['n']})"),
        ("train − test PSNR gap", f"{report['reconstruction_gap_psnr']:.2f} dB"),
        ("test codes: ‖mean‖, ‖Σ−I‖_F/√d, excess kurtosis",
         ", ".join(_fmt(report["test_codes"][k]) for k in list(report["test_codes"])[:3])),
    ]
    raw = report["test_reconstruction_raw_fid_images"]
    if "test_reconstruction_refined_fid_images" in report:
        refined = report["test_reconstruction_refined_fid_images"]
        rows.append((f"test PSNR / SSIM, G → refined ({raw['images']})",
                     f"{raw['psnr']:.2f} → {refined['psnr']:.2f} dB / {raw['ssim']:.4f} → {refined['ssim']:.4f}"))
        rows.append(("refinement", f"{ref['steps']} {ref['optimizer']} steps; "
                                   f"{ref['seconds_per_64_reconstructions']:.1f} s per 64 reconstructions, "
                                   f"{ref['seconds_per_64_samples']:.1f} s per 64 samples ({ref['device']})"))
    cycle = report["cycle_error"]
    rows.append((f"cycle error ‖L S G(z) − z‖/‖z‖, z from {cycle['prior']}",
                 " → ".join(_fmt(cycle[k]) for k in ("raw", "refined") if k in cycle)))
    lines = ["| metric | value |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows]

    fid, mem = report["fid"], report["memorisation"]
    if "skipped" in fid:
        lines += ["", f"FID, KID, precision and recall: {fid['skipped']}"]
    lines += ["", "| images | FID | KID | precision | recall | NN distance to train / test recons' (median) |",
              "| --- | --- | --- | --- | --- | --- |"]

    def row(name: str, scores: dict | None, memo: dict | None) -> str:
        cells = ["–"] * 4 if scores is None else [f"{scores['fid']:.1f}", f"{scores['kid']:.4f}",
                                                   f"{scores['precision']:.3f}", f"{scores['recall']:.3f}"]
        cells.append("–" if memo is None else f"{memo['sample_nn_median']:.3f} / {memo['test_nn_median']:.3f} "
                                               f"(ratio {memo['ratio_median']:.2f})")
        return f"| {name} | " + " | ".join(cells) + " |"

    if "real_images" in fid:
        lines.append(row(f"test images {fid['n']}..{2 * fid['n']}, as they are", fid["real_images"], None))
    for kind in ("raw", "refined"):
        recon_scores = fid.get("reconstructions", {}).get(kind)
        if recon_scores is not None or kind == "raw":
            lines.append(row(f"test reconstructions, {kind}", recon_scores, None))
    for prior, kinds in mem.items():
        for kind, memo in kinds.items():
            lines.append(row(f"samples, {prior} prior, {kind}", fid.get("samples", {}).get(prior, {}).get(kind), memo))
    if "n" in fid:
        lines += ["", f"FID setting: N={fid['n']} vs the {fid['reference']}, {fid['image_size']}² → 299² "
                      f"{fid['resize']}; precision/recall with k=3"]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "evaluation.json", out_dir / "evaluation.md"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=float))
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown_table(report))
    return json_path, md_path
