"""The end of a training run: the code prior is fitted on the train codes, then the bundle,
the pictures and metrics.json are written into the run folder.

With a run budget (run.max_minutes) the prior's fit is what gives way: it gets the time that is
left once the pictures' refinement, estimated from a short probe, is set aside."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import torch

from scatgen.bundle import save_bundle
from scatgen.checkpoints import RunPaths
from scatgen.config import Config, drawn_steps
from scatgen.encoder import Encoder
from scatgen.generators import Generator
from scatgen.pictures import refined_picture_count, save_run_pictures
from scatgen.pipeline import Pipeline
from scatgen.prior import PRIORS, CodePrior, fit_prior
from scatgen.utils import atomic_path


def fit_run_prior(cfg: Config, train_codes: torch.Tensor, encoder: Encoder, progress: bool = True) -> CodePrior | None:
    """The config's code prior, fitted on the train codes (None for 'normal': nothing to fit)."""
    if cfg.prior.kind == "normal":
        return None
    return fit_prior(train_codes, cfg.prior, seed=cfg.run.seed, device=encoder.device, progress=progress,
                     eigenvalues=encoder.whitening.eigenvalues.cpu())


PROBE_CODES, PROBE_STEPS = 16, 4  # the refinement probe: ~0.5 s on 2 cores at 32²
MIN_PRIOR_SHARE = 0.25  # a run that is far behind still gives the prior this share of prior.max_minutes


def pictures_seconds(generator: Generator, encoder: Encoder, cfg: Config, test_codes: torch.Tensor) -> float:
    """Seconds that save_run_pictures will take, estimated: the images it refines × their steps
    (refine.steps, or refine.sample_steps for drawn codes) × the seconds per image and evaluation
    of a probe (refinement is nearly all of its time)."""
    if cfg.refine.steps == 0 or len(test_codes) == 0:
        return 0.0
    pipe = Pipeline(generator, encoder.whitening, cfg, scattering=encoder.scattering, device=encoder.device)
    probe = test_codes[:PROBE_CODES]
    pipe.decode(probe[:2], refine=1)  # warm-up: allocator, FFT plans
    tic = time.perf_counter()
    pipe.decode(probe, refine=PROBE_STEPS)
    per_evaluation = (time.perf_counter() - tic) / (len(probe) * PROBE_STEPS)
    invertible = PRIORS[cfg.prior.kind].cls.invertible
    image_codes, drawn = refined_picture_count(len(test_codes), 1 + (cfg.prior.kind != "normal"), invertible)
    return (image_codes * cfg.refine.steps + drawn * drawn_steps(cfg.refine)) * per_evaluation


def prior_minutes(cfg: Config, seconds_left: float, reserve: float) -> tuple[float, str]:
    """The prior's budget in minutes when the run has `seconds_left` of run.max_minutes and the
    pictures need `reserve` of them, and a line that says so; prior.max_minutes if that fits."""
    own = cfg.prior.max_minutes
    available = (seconds_left - reserve) / 60
    if own > 0 and available >= own:
        return own, ""
    floor = MIN_PRIOR_SHARE * own if own > 0 else 0.5
    minutes = max(available, floor)
    of = f" of its {own:g}" if own > 0 else ""
    note = (f"run.max_minutes={cfg.run.max_minutes:g}: {seconds_left / 60:.1f} minutes left, {reserve / 60:.1f} of them "
            f"kept for the pictures; the prior gets {minutes:.1f}{of}")
    if minutes > available:
        note += f", so the run will end about {(minutes - available):.1f} minutes late"
    return minutes, note


def finish_run(cfg: Config, paths: RunPaths, generator: Generator, encoder: Encoder, train_codes: torch.Tensor,
               test_codes: torch.Tensor, test_images: torch.Tensor, metrics: dict, progress: bool = True,
               deadline: float | None = None) -> dict:
    """Prior, bundle, pictures (of the test codes and images given) and metrics.json; → the metrics
    with the seconds each stage took. `deadline` (time.time() at which run.max_minutes ends, or
    None) shortens the prior's fit so that the pictures still end by it."""
    fit_cfg = cfg
    if deadline is not None and cfg.prior.kind != "normal":
        reserve = pictures_seconds(generator, encoder, cfg, test_codes)
        minutes, note = prior_minutes(cfg, deadline - time.time(), reserve)
        if note:
            print(note)
            fit_cfg = replace(cfg, prior=replace(cfg.prior, max_minutes=minutes))
        metrics = dict(metrics, pictures_estimate_seconds=reserve, prior_budget_minutes=minutes)
    tic = time.time()
    prior = fit_run_prior(fit_cfg, train_codes, encoder, progress)
    metrics = dict(metrics, prior_seconds=time.time() - tic)
    if prior is not None and prior.steps_taken:
        metrics["prior_steps"] = prior.steps_taken
        metrics["prior_precision"] = prior.step_precision
    priors = {} if prior is None else {prior.kind: prior}
    save_bundle(paths.model, generator, encoder.whitening, cfg, priors=list(priors.values()))
    tic = time.time()
    pipe = Pipeline(generator, encoder.whitening, cfg, scattering=encoder.scattering, device=encoder.device,
                    priors=priors)
    save_run_pictures(pipe, test_codes, test_images, paths.images, cfg.run.seed)
    metrics["pictures_seconds"] = time.time() - tic
    with atomic_path(paths.root / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    return metrics
