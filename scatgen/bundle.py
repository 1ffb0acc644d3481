"""The model bundle: everything sampling needs, nothing pickled.

    model/
      model.safetensors       generator weights
      whitening.safetensors   μ, U, Λ and their metadata
      config.yaml             the resolved training config
      bundle.json             format version and the shapes that must agree
      priors/KIND.safetensors the fitted code priors (optional; without one, sampling uses N(0, I))
      checksums.json          sha256 of every file above, checked on load
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scatgen.config import Config, config_from_dict, read_yaml, save_config
from scatgen.generators import Generator, build_generator
from scatgen.integrity import CorruptFileError, update_manifest, verify_manifest, write_manifest
from scatgen.prior import CodePrior, load_prior, save_prior
from scatgen.utils import atomic_path
from scatgen.whitening import Whitening

FORMAT_VERSION = 1
_CHECKED = ("J", "L", "image_size", "d")


def bundle_info(cfg: Config, whitening: Whitening) -> dict[str, Any]:
    return dict(format_version=FORMAT_VERSION, J=cfg.encoder.J, L=cfg.encoder.L, image_size=cfg.data.image_size,
                d=whitening.d, D=whitening.D, generator=cfg.generator.kind, dataset=cfg.data.name)


def save_bundle(path: str | Path, generator: Generator, whitening: Whitening, cfg: Config,
                priors: list[CodePrior] | None = None) -> Path:
    """Write the bundle directory atomically and return its path."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / "model.safetensors"))
        whitening.save(tmp / "whitening.safetensors")
        save_config(cfg, tmp / "config.yaml")
        info = dict(bundle_info(cfg, whitening), num_parameters=sum(p.numel() for p in generator.parameters()))
        (tmp / "bundle.json").write_text(json.dumps(info, indent=2))
        for prior in priors or []:
            save_prior(prior, tmp / "priors" / f"{prior.kind}.safetensors")
        write_manifest(tmp)
    return path


def add_prior(path: str | Path, prior: CodePrior) -> Path:
    """Write (or replace) one prior inside an existing bundle, atomically."""
    path = find_bundle(path)
    saved = save_prior(prior, path / "priors" / f"{prior.kind}.safetensors")
    update_manifest(path, f"priors/{prior.kind}.safetensors")
    return saved


def load_priors(path: str | Path) -> dict[str, CodePrior]:
    """{kind: prior} for every prior the bundle holds; {} for a bundle saved without one."""
    folder = find_bundle(path) / "priors"
    priors = {}
    for file in sorted(folder.glob("*.safetensors")):
        prior = load_prior(file)
        if prior.kind != file.stem:
            raise ValueError(f"prior file '{file}' holds a '{prior.kind}' prior; rename it {prior.kind}.safetensors")
        priors[prior.kind] = prior
    return priors


def find_bundle(path: str | Path) -> Path:
    """Accept a bundle directory or a run directory that holds one in model/."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / "bundle.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no model bundle at '{path}': expected a folder with bundle.json, model.safetensors, "
        f"whitening.safetensors and config.yaml (a run directory's model/ subfolder); train one with train.py"
    )


def load_bundle(path: str | Path, device: torch.device | str = "cpu") -> tuple[Generator, Whitening, Config]:
    """(generator in eval mode, whitening, config); refuses a bundle whose parts disagree on J, L,
    image_size or d."""
    path = find_bundle(path)
    for name in ("model.safetensors", "whitening.safetensors", "config.yaml"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"incomplete bundle '{path}': {name} is missing")
    try:
        verify_manifest(path)
    except CorruptFileError as e:
        raise CorruptFileError(f"corrupt bundle: {e}; copy the bundle again or retrain") from None
    try:
        info = json.loads((path / "bundle.json").read_bytes().decode("utf-8"))
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt bundle: '{path / 'bundle.json'}' is not valid JSON ({e}); copy the bundle "
                         f"again or retrain") from None
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"bundle '{path}' has format version {info.get('format_version')}, "
                         f"this scatgen reads version {FORMAT_VERSION}; retrain or use a matching scatgen")
    tree = read_yaml(path / "config.yaml", "bundle config")
    if not isinstance(tree, dict):
        raise ValueError(f"corrupt bundle: '{path / 'config.yaml'}' is not a mapping of config sections")
    cfg = config_from_dict(tree)
    whitening = Whitening.load(path / "whitening.safetensors")
    actual = bundle_info(cfg, whitening)
    sources = {"bundle.json": info, "whitening metadata": {**whitening.metadata, "d": whitening.d}}
    for source, values in sources.items():
        for key in _CHECKED:
            if key in values and values[key] != actual[key]:
                raise ValueError(
                    f"incompatible bundle '{path}': {key}={actual[key]} in its config, but {key}={values[key]} "
                    f"in {source}. Use a bundle trained with {key}={values[key]}, or retrain.")
    generator = build_generator(cfg.generator, code_dim=whitening.d, image_size=cfg.data.image_size,
                                J=cfg.encoder.J, L=cfg.encoder.L)
    try:
        state = load_file(str(path / "model.safetensors"))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"corrupt bundle: '{path / 'model.safetensors'}' is not a readable safetensors file "
                         f"({str(e).splitlines()[0]}); copy the bundle again or retrain") from None
    try:
        generator.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"bundle '{path}': the weights do not fit the {cfg.generator.kind} generator its "
                         f"config describes ({str(e).splitlines()[0]}); the bundle is corrupt or mixed") from None
    return generator.to(device).eval(), whitening.to(device), cfg
