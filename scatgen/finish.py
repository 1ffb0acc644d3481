"""The end of a training run: the code prior is fitted on the train codes, then the bundle,
the pictures and metrics.json are written into the run folder."""

from __future__ import annotations

import json
import time

import torch

from scatgen.bundle import save_bundle
from scatgen.checkpoints import RunPaths
from scatgen.config import Config
from scatgen.encoder import Encoder
from scatgen.generators import Generator
from scatgen.pictures import save_run_pictures
from scatgen.pipeline import Pipeline
from scatgen.prior import CodePrior, fit_prior
from scatgen.utils import atomic_path


def fit_run_prior(cfg: Config, train_codes: torch.Tensor, encoder: Encoder, progress: bool = True) -> CodePrior | None:
    """The config's code prior, fitted on the train codes (None for 'normal': nothing to fit)."""
    if cfg.prior.kind == "normal":
        return None
    return fit_prior(train_codes, cfg.prior, seed=cfg.run.seed, device=encoder.device, progress=progress,
                     eigenvalues=encoder.whitening.eigenvalues.cpu())


def finish_run(cfg: Config, paths: RunPaths, generator: Generator, encoder: Encoder, train_codes: torch.Tensor,
               test_codes: torch.Tensor, test_images: torch.Tensor, metrics: dict, progress: bool = True) -> dict:
    """Prior, bundle, pictures (of the test codes and images given) and metrics.json; → the metrics
    with the seconds each stage took."""
    tic = time.time()
    prior = fit_run_prior(cfg, train_codes, encoder, progress)
    metrics = dict(metrics, prior_seconds=time.time() - tic)
    if prior is not None and prior.steps_taken:
        metrics["prior_steps"] = prior.steps_taken
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
