"""The user-facing model: image ⇄ code through S_J, the whitening, the code prior,
the generator and the refinement.

    pipe = scatgen.load("runs/polygons")
    codes = pipe.encode(images)              # (B, 3, N, N) in [-1, 1] → (B, d)
    recons = pipe.decode(codes, refine=0)    # (B, d) → (B, 3, N, N): G(z) alone
    recons = pipe.reconstruct(images)        # G(L S_J x), refined towards S_J x
    samples = pipe.sample(16, seed=0)        # codes from the bundle's prior, decoded and refined
    path = pipe.interpolate(za, zb, steps=8) # (steps, 3, N, N); path="prior" goes through its noise
    variations = pipe.vary(image, strength=0.5, n=8)
    pipe.save_pretrained("my-model")         # a bundle in the layout of huggingface_hub's ModelHubMixin

`refine=None` means the bundle's refine.steps (refine.sample_steps, where set, for codes a prior
drew: sample, vary, interpolate); 0 turns refinement off.

Pipeline is a huggingface_hub ModelHubMixin: save_pretrained writes the bundle (model.safetensors
and config.json at the top, as the Hub expects, beside scatgen's own files) and from_pretrained
reads a folder or a Hub repo. scatgen.load never downloads: a repo id must be in the local cache.
"""

from __future__ import annotations

import json
import numbers
import re
from dataclasses import replace
from pathlib import Path

import torch
from huggingface_hub import ModelHubMixin, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

from scatgen.checks import (check_code_or_image, check_codes, check_device, check_images, check_dims, check_seed,
                            positive_number, whole_number)
from scatgen.config import Config, RefineConfig, drawn_steps
from scatgen.encoder import Encoder
from scatgen.generators import Generator
from scatgen.prior import CodePrior, NormalPrior
from scatgen.refinement import refine_decodings, refine_reconstructions
from scatgen.scattering import Scattering
from scatgen.utils import progress_bar
from scatgen.whitening import Whitening

PROGRESS_DELAY_S = 5.0  # a decode that takes longer than this shows a progress bar


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1 − t) a + t b for codes a, b (d,) and weights t (K,) → (K, d)."""
    return (1 - t)[:, None] * a + t[:, None] * b


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation: keeps the norm that Gaussian codes concentrate on. (K, d)."""
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    if omega.abs() < 1e-6:
        return lerp(a, b, t)
    return (torch.sin((1 - t) * omega)[:, None] * a + torch.sin(t * omega)[:, None] * b) / torch.sin(omega)


MODEL_CARD = """
---
{{ card_data }}
---

A generative scattering network (Angles & Mallat, ICLR 2018), trained with scatgen: a fixed
wavelet scattering transform and a linear whitening encode an image into a code, and a
convolutional generator decodes it. Load it with

```python
import scatgen
pipe = scatgen.load("THIS_FOLDER_OR_REPO_ID")   # a repo id is read from the local cache only
samples = pipe.sample(16, seed=0)
```

config.yaml holds the training config; bundle.json the format version and shapes.
"""


class Pipeline(ModelHubMixin, library_name="scatgen", model_card_template=MODEL_CARD,
               paper_url="https://arxiv.org/abs/1805.06621", tags=["generative-scattering-network"]):
    """Encoder (fixed scattering + whitening), code priors and generator, on one device."""

    # The mixin would otherwise make a config of __init__'s arguments (a generator, tensors):
    # config.json is written by _save_pretrained from cfg instead.
    _hub_mixin_config = {}

    def __init__(self, generator: Generator, whitening: Whitening, cfg: Config,
                 scattering: Scattering | None = None, device: torch.device | str = "cpu",
                 priors: dict[str, CodePrior] | None = None) -> None:
        self.device = check_device(device)
        self.generator = generator.to(self.device).eval()
        self.encoder = Encoder(cfg, whitening, scattering, self.device)
        for kind, prior in (priors or {}).items():
            if prior.d != whitening.d:
                raise ValueError(f"the '{kind}' prior draws codes of d={prior.d}, but the whitening makes d="
                                 f"{whitening.d}; refit it with `python sample.py fit-prior RUN --kind {kind}`")
        self.priors: dict[str, CodePrior] = {"normal": NormalPrior(whitening.d), **(priors or {})}
        self._fitted_priors = dict(priors or {})  # what a saved bundle holds; N(0, I) is always there

    @property
    def cfg(self) -> Config:
        return self.encoder.cfg

    @cfg.setter
    def cfg(self, cfg: Config) -> None:
        # One config for the pipeline and its encoder: a changed cache folder or scattering
        # backend reaches the scattering the encoder builds.
        self.encoder.cfg = cfg

    @property
    def image_size(self) -> int:
        return self.cfg.data.image_size

    @property
    def d(self) -> int:
        return self.whitening.d

    @property
    def default_prior(self) -> str:
        """The config's prior.kind when the bundle holds it, else 'normal' (bundles without a prior)."""
        return self.cfg.prior.kind if self.cfg.prior.kind in self.priors else "normal"

    @property
    def whitening(self) -> Whitening:
        return self.encoder.whitening

    @property
    def scattering(self) -> Scattering:
        return self.encoder.scattering

    def refine_settings(self, refine: int | None = None, drawn: bool = False) -> RefineConfig:
        """The bundle's refine config with `refine` steps (None: its own refine.steps). For codes a
        prior `drawn`: refine.sample_steps where that is set and refine.steps > 0, and the TV weight
        refine.sample_tv in place of refine.tv."""
        own = drawn_steps(self.cfg.refine) if drawn else self.cfg.refine.steps
        steps = own if refine is None else refine
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"refine must be a number of steps >= 0 (0 = off, None = the bundle's "
                             f"{self.cfg.refine.steps}), got {refine!r}")
        tv = self.cfg.refine.sample_tv if drawn else self.cfg.refine.tv
        return replace(self.cfg.refine, steps=int(steps), tv=tv)

    def encode(self, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """images (B, 3, N, N) in [-1, 1] → codes (B, d) = L (S_J x − μ).

        uint8 images (0–255) are converted with v / 127.5 − 1; float images outside [-1, 1] or
        with NaN/inf are refused, and images all in [0, 1] warn (ImageRangeWarning)."""
        return self.encoder.encode(check_images(images, self.image_size), whole_number(batch_size, "batch_size", 1))

    def decode(self, codes: torch.Tensor, refine: int | None = None, batch_size: int = 256,
               dims: int | None = None, tv: float | None = None, drawn_by: str | None = None) -> torch.Tensor:
        """codes (B, d) → images (B, 3, N, N) in [-1, 1]: G(z), then `refine` steps towards
        the code's coefficients in the whitening's PCA basis (its `dims` leading ones, 0..d; None: all),
        with total variation weighted by `tv`.

        `drawn_by` names the prior that drew the codes (a kind the bundle holds; sample, vary and
        interpolate pass theirs), None an image's code. A drawn code is no image's exact code, so it
        refines for refine.sample_steps (where set) with refine.sample_tv, and may move along that
        prior's surface (refine.latent_spread > 0, priors with a latent: latent_flow); an image's
        code refines for refine.steps with refine.tv. `refine` and `tv` override the steps and TV.

        Codes of any floating dtype are converted to float32; integer or bool codes and NaN/inf
        are refused. A long decode shows a progress bar on stderr."""
        codes = check_codes(codes, self.d)
        dims = check_dims(dims, self.d)
        batch_size = whole_number(batch_size, "batch_size", 1)
        along = None if drawn_by is None else self.prior(drawn_by)
        cfg = self.refine_settings(refine, drawn=along is not None)
        if tv is not None:
            cfg = replace(cfg, tv=positive_number(tv, "tv", zero=True))
        n = self.image_size
        out = torch.empty(len(codes), 3, n, n)  # filled in place: no second copy of a large batch
        if len(codes) == 0:
            return out
        self.generator.eval()
        with torch.no_grad():
            for start in progress_bar(range(0, len(codes), batch_size), desc="decoding", unit="batch", leave=False,
                                      delay=PROGRESS_DELAY_S):
                chunk = codes[start:start + batch_size].to(self.device)
                out[start:start + len(chunk)] = self.generator(chunk)[0].float().cpu()
        if cfg.steps == 0:
            return out
        return refine_decodings(self.encoder, out, codes, cfg, dims, prior=along)

    def random_codes(self, n: int, seed: int = 0, temperature: float = 1.0, prior: str | None = None) -> torch.Tensor:
        """n codes from a prior ('normal', or one the bundle holds; None = the default)."""
        n = whole_number(n, "the number of samples n", 1)
        seed, temperature = check_seed(seed), positive_number(temperature, "temperature")
        return self.prior(prior).sample(n, seed=seed, temperature=temperature)

    def sample(self, n: int, seed: int = 0, temperature: float = 1.0, prior: str | None = None,
               refine: int | None = None) -> torch.Tensor:
        """n images decoded from the prior's codes (temperature scales its noise). Refinement
        targets the components the prior models; the rest are its noise, not information."""
        codes = self.random_codes(n, seed, temperature, prior)
        return self.decode(codes, refine=refine, dims=self.prior(prior).dims, drawn_by=prior or self.default_prior)

    def reconstruct(self, images: torch.Tensor, refine: int | None = None) -> torch.Tensor:
        """G(L S_J x), then `refine` steps towards the full S_J x (images as for encode)."""
        images = check_images(images, self.image_size)
        cfg = self.refine_settings(refine)
        recons = self.decode(self.encoder.encode(images), refine=0)
        if cfg.steps == 0 or len(images) == 0:
            return recons
        return refine_reconstructions(self.scattering, recons, images, cfg)

    def prior(self, kind: str | None = None) -> CodePrior:
        """The bundle's prior of that kind (None: the default), or a ValueError that lists the
        kinds it holds and says how to fit another."""
        kind = self.default_prior if kind is None else kind
        if kind not in self.priors:
            raise ValueError(f"no '{kind}' prior in this bundle (it has {', '.join(self.priors)}); "
                             f"fit one with `python sample.py fit-prior RUN --kind {kind}`")
        return self.priors[kind]

    def interpolate_codes(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, path: str = "code",
                          spherical: bool = False, prior: str | None = None) -> torch.Tensor:
        """Codes along the paths from a to b ((n, d) each) at weights t (K,) → (n, K, d).

        path='code' is the straight line in code space (slerp with `spherical`); path='prior'
        carries both ends to the prior's noise, interpolates there (slerp: noise concentrates on a
        sphere) and carries each point back. Each end's residual (what the prior does not
        reproduce of it) is added with weight (1 − t)² for a and t² for b: t = 0 and t = 1 return
        a and b, and mid-path the two ends' details, which a linear blend lays over each other at
        half strength (ghosts), are down to a quarter each."""
        if path not in ("code", "prior"):
            raise ValueError(f"path must be 'code' (a straight line between codes) or 'prior' (through the "
                             f"prior's noise), got {path!r}")
        a, b, t = check_codes(a, self.d), check_codes(b, self.d), t.float()
        if a.shape != b.shape:
            raise ValueError(f"interpolate_codes pairs a[i] with b[i]: got {len(a)} and {len(b)} codes")
        if len(a) == 0:
            return torch.empty(0, len(t), self.d)
        if path == "code":
            mix = slerp if spherical else lerp
            return torch.stack([mix(u, v, t) for u, v in zip(a, b)])
        code_prior = self.prior(prior)
        (noise_a, rest_a), (noise_b, rest_b) = code_prior.to_noise(a), code_prior.to_noise(b)
        noise = torch.stack([slerp(u, v, t) for u, v in zip(noise_a, noise_b)])  # (n, K, m)
        fade_a, fade_b = (1 - t).square()[:, None], t.square()[:, None]  # (K, 1)
        rest = fade_a * rest_a[:, None] + fade_b * rest_b[:, None]  # (n, K, d)
        codes = code_prior.from_noise(noise.flatten(0, 1)).reshape(len(a), len(t), -1) + rest
        # The ends themselves, not their round trip through the noise, which returns them only up to
        # rounding (and refinement can enlarge that).
        codes[:, t == 0], codes[:, t == 1] = a[:, None].float(), b[:, None].float()
        return codes

    def interpolation_path(self, path: str | None = None, spherical: bool = False, prior: str | None = None) -> str:
        """`path`, or for None the default: 'prior' where that prior is invertible and the path is
        not spherical, else 'code'."""
        if path is not None:
            return path
        return "prior" if self.prior(prior).invertible and not spherical else "code"

    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int = 8, spherical: bool = False,
                    refine: int | None = None, dims: int | None = None, path: str | None = None,
                    prior: str | None = None) -> torch.Tensor:
        """Decode `steps` codes from a to b (each (d,), or an image (3, N, N) to encode first)
        along `path` (see interpolate_codes); `dims` as in decode (the prior's modelled components
        when an end is a prior's draw). path=None goes through the prior where it is invertible
        (its midpoints measured 2.7× the straight line's precision on polygons, benchmarks/README.md)
        and along the straight line otherwise, or with `spherical`."""
        steps = whole_number(steps, "steps (images along the path, both ends included)", 2)
        path = self.interpolation_path(path, spherical, prior)
        if spherical and path != "code":
            raise ValueError("spherical=True is a path between codes: use it with path='code'")
        a, b = (check_code_or_image(v, self.d, self.image_size, name) for v, name in ((a, "a"), (b, "b")))
        a, b = (self.encoder.encode(v[None])[0] if v.ndim == 3 else v for v in (a, b))
        codes = self.interpolate_codes(a[None], b[None], torch.linspace(0, 1, steps), path, spherical, prior)[0]
        return self.decode(codes, refine=refine, dims=dims, drawn_by=prior or self.default_prior)

    def vary(self, image: torch.Tensor, strength: float = 0.5, n: int = 8, seed: int = 0,
             prior: str | None = None, refine: int | None = None) -> torch.Tensor:
        """n variations of an image (3, N, N), or of a code (d,): its code is carried part of the
        way to the prior's noise (`strength` in [0, 1]) and back. strength 0 gives n copies of the
        image's own decoding; 1 gives fresh samples. → (n, 3, N, N)."""
        n, seed = whole_number(n, "the number of variations n", 1), check_seed(seed)
        code_prior = self.prior(prior)
        image = check_code_or_image(image, self.d, self.image_size, "image")
        code = self.encoder.encode(image[None])[0] if image.ndim == 3 else image
        codes = code_prior.vary(code.float()[None].expand(n, -1), strength, seed)
        if strength == 0:  # the image's own decoding
            return self.decode(codes, refine=refine)
        return self.decode(codes, refine=refine, drawn_by=prior or self.default_prior)

    # -- hub-style bundles (huggingface_hub.ModelHubMixin) -------------------------------------------

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> str | None:
        """Write the bundle into `save_directory` (model.safetensors, whitening.safetensors,
        config.yaml, bundle.json, priors/, and config.json plus a model card README.md for the
        Hub); `push_to_hub=True, repo_id=...` uploads it, as ModelHubMixin.save_pretrained does."""
        folder = Path(save_directory)
        # The bundle replaces the whole folder: refuse one that holds anything else (a run directory).
        ours = {"model.safetensors", "whitening.safetensors", "config.yaml", "bundle.json", "priors",
                "checksums.json", "config.json", "README.md"}
        others = sorted(p.name for p in folder.iterdir() if p.name not in ours) if folder.is_dir() else []
        if others:
            raise ValueError(f"save_pretrained: '{folder}' holds other files ({', '.join(others[:3])}); "
                             f"save into a new folder or over an earlier bundle")
        return super().save_pretrained(folder, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        from scatgen.bundle import bundle_info, save_bundle
        from scatgen.config import config_to_dict
        from scatgen.integrity import update_manifest

        save_bundle(save_directory, self.generator, self.whitening, self.cfg,
                    priors=list(self._fitted_priors.values()))
        # The Hub reads config.json (and counts downloads by it); config.yaml stays the one scatgen reads.
        config = {"scatgen": bundle_info(self.cfg, self.whitening), "config": config_to_dict(self.cfg)}
        (save_directory / "config.json").write_text(json.dumps(config, indent=2))
        update_manifest(save_directory, "config.json")

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         device: torch.device | str = "cpu") -> Pipeline:
        folder = Path(model_id)
        if not folder.is_dir():
            folder = Path(snapshot_download(repo_id=model_id, revision=revision, cache_dir=cache_dir,
                                            force_download=force_download, local_files_only=local_files_only,
                                            token=token))
        return _load_folder(folder, device)


def _load_folder(path: Path, device: torch.device | str) -> Pipeline:
    from scatgen.bundle import find_bundle, load_bundle, load_priors
    from scatgen.config import config_from_dict

    device = check_device(device)  # before any weights move there
    generator, whitening, cfg = load_bundle(path, device=device)
    hub_config = find_bundle(path) / "config.json"
    if hub_config.is_file() and config_from_dict(json.loads(hub_config.read_text())["config"]) != cfg:
        raise ValueError(f"bundle '{hub_config.parent}': config.json and config.yaml disagree; scatgen reads "
                         f"config.yaml, so edit that one and save the bundle again")
    return Pipeline(generator, whitening, cfg, device=device, priors=load_priors(path))


REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load(path: str | Path, device: torch.device | str = "cpu") -> Pipeline:
    """A Pipeline from a run directory, a bundle directory (train.py's model/ or save_pretrained's),
    or the id of a Hugging Face repo ("owner/name") in the local cache. Never downloads: fetch a
    repo first with huggingface_hub.snapshot_download, or use Pipeline.from_pretrained."""
    if Path(path).exists() or not REPO_ID.fullmatch(str(path)):
        return _load_folder(Path(path), device)
    try:
        return Pipeline.from_pretrained(str(path), local_files_only=True, device=device)
    except (LocalEntryNotFoundError, HFValidationError):
        raise FileNotFoundError(
            f"no model bundle at '{path}': it is neither a folder nor a Hugging Face repo in the local cache "
            f"(scatgen.load never downloads); pass a run or bundle folder, or fetch the repo first with "
            f"huggingface_hub.snapshot_download('{path}')") from None
