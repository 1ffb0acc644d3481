"""Typed configuration: one dataclass per stage, loaded from YAML with dotted overrides.

A config file holds only what differs from the defaults below. Every value is
converted by its field's declared type, and an unknown key is an error that names
the closest valid one, before any work starts. A key given twice in one mapping is an
error, and YAML aliases may not expand a file beyond YAML_MAX_VALUES values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scatgen.filter_bank import scattering_channels
from scatgen.utils import short_repr


@dataclass
class DataConfig:
    name: str = "polygons"  # polygons | celeba | folder
    root: str = ""  # dataset directory (celeba, folder); unused for polygons
    image_size: int = 32  # N, pixels; polygons: 32, 64 or 128
    crop: int = 0  # centre crop before resizing, pixels; 0 = 140 for 64², 178 for 128², none otherwise
    seed: int = 0  # polygons: generator seed; folder: seed of the hashed split
    num_train: int = 10000  # images in the train split; 0 = all (celeba, folder)
    num_test: int = 1000  # images in the test split; 0 = all (celeba, folder)
    test_fraction: float = 0.1  # folder: share of files hashed into the test split
    split: str = "auto"  # folder: hash | folders (root/train + root/test or val) | auto = folders when present
    cache_images: bool = True  # store decoded, resized images once as uint8 (n·3N² bytes) under run.cache_dir; false = decode every step


@dataclass
class EncoderConfig:
    J: int = 4  # scales: averaging over 2^J pixels
    L: int = 8  # orientations
    backend: str = "fast"  # fast | kymatio
    batch_size: int = 128  # images per scattering batch
    compile: bool = False  # torch.compile the scattering (inductor: gcc on CPU, Triton on GPU); see benchmarks/train_throughput.py


@dataclass
class WhiteningConfig:
    d: int = 512  # code dimension
    method: str = "auto"  # auto | exact | randomized; auto = exact when D <= 2048 (whitening.EXACT_MAX_DIM)
    oversample: int = 64  # randomized: extra directions in the sketch
    power_iters: int = 2  # randomized: power iterations, each one pass over the data
    max_images: int = 0  # fit on at most this many train images; 0 = all
    spill_gb: float = 8.0  # keep train coeffs on disk between passes when they take at most this; 0 = rescatter
    eps: float = 1e-6  # eigenvalue floor, relative to the largest eigenvalue


@dataclass
class TrainConfig:
    loss: str = "l1"  # l1 | l2
    lr: float = 1e-3  # Adam learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas
    weight_decay: float = 0.0  # Adam (decoupled) weight decay
    schedule: str = "cosine"  # constant | cosine | linear; decays after warmup, over max_steps or max_minutes, whichever ends first
    warmup_steps: int = 100  # linear warmup, steps
    batch_size: int = 128  # images per step per process
    max_steps: int = 2000  # optimizer steps; 0 = use epochs
    epochs: int = 0  # used when max_steps = 0
    max_minutes: float = 0.0  # stop after this wall-clock time; 0 = no limit
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    code_noise: float = 0.0  # ν in [0, 1): codes scaled by sqrt(1−ν) plus noise so each component has unit variance
    mixed_precision: str = "auto"  # auto (bf16 on GPU; on CPU bf16 where it times faster, in a one-process run bound by max_minutes) | no | bf16 | fp16
    num_workers: int = 0  # DataLoader worker processes
    eval_every: int = 500  # steps between test PSNR evaluations and image grids
    eval_images: int = 500  # test images used for the periodic PSNR
    log_every: int = 20  # steps between scalar logs
    checkpoint_every: int = 500  # steps between accelerate checkpoints
    keep_checkpoints: int = 2  # checkpoints kept on disk
    grid_size: int = 16  # images per logged grid
    compile: bool = False  # torch.compile the generator (inductor); the first steps pay the compilation


@dataclass
class PriorConfig:
    kind: str = "flow"  # normal | gmm | flow | latent_flow: the code prior train.py fits and sampling uses by default
    dims: int = 64  # gmm, flow: leading code components modelled, the rest drawn from N(0, I); 0 = all
    components: int = 10  # gmm: mixture components
    covariance: str = "full"  # gmm: full | diag
    width: int = 512  # flow: hidden width of the velocity MLP
    depth: int = 3  # flow: residual blocks
    fit_steps: int = 3000  # flow: optimizer steps
    batch_size: int = 256  # flow: codes per step
    lr: float = 1e-3  # flow: AdamW learning rate, cosine-decayed
    sample_steps: int = 32  # flow: Heun steps from noise to code
    sde_noise: float = 0.0  # flow: s >= 0, samples follow an SDE with g² = s(1 − t) on the ODE's marginals; 0 = the ODE (interpolation and variations always use it)
    conditioning: str = "input"  # flow: how the velocity MLP sees the time: input (concatenated once) | adaln (modulates every block)
    ema: float = 0.0  # flow: decay of the weights' moving average that sampling uses; 0 = the last weights
    guide_at: float = 0.0  # flow: keep a copy of the velocity field as it was at this fraction of its fit (the guide); 0 = none
    guidance: float = 1.0  # flow: w >= 1, samples follow guide + w (field − guide), away from the guide's errors (autoguidance); 1 = the field alone
    latent: int = 32  # latent_flow: size of the autoencoder's latent that the flow models
    autoencoder_width: int = 0  # latent_flow: hidden width of the autoencoder; 0 = prior.width (the flow's)
    autoencoder_steps: int = 3000  # latent_flow: optimizer steps of the autoencoder (the flow then takes fit_steps)
    code_weighting: float = 0.25  # latent_flow: γ ≥ 0, the autoencoder's squared error weighs code component k by λ_k^γ (mean 1); 0 = plain whitened error
    latent_noise: float = 0.1  # latent_flow: noise on the latents while the autoencoder trains, in units of their spread; 0 = none
    max_minutes: float = 0.0  # flow, latent_flow: wall-clock budget of the fit, shared by the stages in proportion to their steps; 0 = steps only
    mixed_precision: str = "auto"  # flow, latent_flow: the fit's steps under bf16 autocast: auto (bf16 where it times faster, in a fit bound by max_minutes) | no | bf16


@dataclass
class RefineConfig:
    steps: int = 50  # gradient evaluations on the scattering mismatch; 0 = raw G(z)
    sample_steps: int = 0  # evaluations for codes a prior drew (samples, variations, interpolation paths); 0 = refine.steps (steps 0: off)
    optimizer: str = "lbfgs"  # lbfgs (per image, Armijo line search) | adam
    lr: float = 0.01  # adam only: step size, in pixels of [-1, 1]
    weighting: float = 0.5  # α: code objective weighs PCA coordinate k by λ_k^-α; 0 = PCA, 1 = whitened
    anchor: float = 1.0  # β: keeps the D − d coefficients a code does not fix near G's; 0 = free
    tv: float = 0.0  # colour total-variation weight when refining towards an image's code (decode); reconstructions, which know all of S_J x, take none
    sample_tv: float = 0.0  # the same for codes a prior drew (samples, variations, interpolation paths)
    latent_spread: float = 0.0  # σ: a drawn code may move along a latent_flow prior's surface, at a cost ‖u − u₀‖²/σ² in its latent; 0 = fixed
    balance: float = 0.5  # reconstructions weigh scattering order m by (E_0/E_m)^balance (E_m: its energy); 0 = plain
    batch_size: int = 64  # images refined at once (results do not depend on it)


@dataclass
class RunConfig:
    out_dir: str = "runs/polygons"  # run directory
    cache_dir: str = ".cache/scatgen"  # code and filter cache
    seed: int = 0  # global seed: data order, initialisation, noise
    resume: str = ""  # "" | latest | path to a checkpoint folder
    overwrite: bool = False  # start afresh in an out_dir that holds another run's checkpoints or bundle (deletes them)
    max_minutes: float = 0.0  # the whole run's wall-clock budget; the prior's fit gets what G and the pictures leave; 0 = off


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    whitening: WhiteningConfig = field(default_factory=WhiteningConfig)
    generator: Any = None  # a generator's own config dataclass, picked by `kind`
    train: TrainConfig = field(default_factory=TrainConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.generator is None:
            from scatgen.generators import generator_config_class

            self.generator = generator_config_class("gsn")()


CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": ("polygons", "celeba", "folder"),
    "data.split": ("auto", "hash", "folders"),
    "encoder.backend": ("fast", "kymatio"),
    "whitening.method": ("auto", "exact", "randomized"),
    "train.loss": ("l1", "l2"),
    "train.schedule": ("constant", "cosine", "linear"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "prior.covariance": ("full", "diag"),
    "prior.mixed_precision": ("auto", "no", "bf16"),
    "refine.optimizer": ("adam", "lbfgs"),
}


def _convert(value: Any, typ: Any, key: str) -> Any:
    """Convert `value` to the declared field type `typ`, or raise a ValueError naming `key`."""
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            if isinstance(value, bool):
                return value
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = int(value) if not isinstance(value, str) else int(value, 0)
            if abs(number) >= 2**63:  # torch and numpy take 64-bit integers; more would overflow later
                raise ValueError
            return number
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if origin is tuple:
            if isinstance(value, str):
                value = load_yaml_text(value if value.startswith("[") else f"[{value}]")
            args = typing.get_args(typ)
            if not isinstance(value, (list, tuple)) or len(value) != len(args):
                raise ValueError
            return tuple(_convert(v, a, key) for v, a in zip(value, args))
        if origin in (typing.Union, types.UnionType):
            return value
    except (TypeError, ValueError):
        raise ValueError(
            f"config key '{key}': got {short_repr(value)}, expected a value of type {getattr(typ, '__name__', typ)}"
        ) from None
    return value


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f" Did you mean '{match[0]}'?" if match else ""


def _section_fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def valid_keys(cfg: Config) -> list[str]:
    """All dotted keys that `cfg` accepts, e.g. 'train.lr'."""
    keys = []
    for section in _section_fields(cfg):
        keys += [f"{section}.{name}" for name in _section_fields(getattr(cfg, section))]
    return keys


def _apply(cfg: Config, flat: dict[str, Any]) -> None:
    from scatgen.generators import generator_config_class

    # The generator section's fields depend on its kind, so the kind goes first.
    if "generator.kind" in flat:
        kind = flat.pop("generator.kind")
        if kind != cfg.generator.kind:
            cfg.generator = generator_config_class(str(kind))()
    for key, value in flat.items():
        parts = key.split(".")
        if len(parts) == 1 and key in _section_fields(cfg):
            raise ValueError(f"config section '{key}' must be a mapping of its fields (indented `field: value` lines under `{key}:`), "
                             f"got {short_repr(value)}")
        if len(parts) != 2 or parts[0] not in _section_fields(cfg):
            raise ValueError(
                f"unknown config key '{key}'.{_closest(key, valid_keys(cfg))} "
                f"Valid keys: {', '.join(valid_keys(cfg))}"
            )
        section, name = parts
        obj = getattr(cfg, section)
        fields = _section_fields(obj)
        if name not in fields:
            section_keys = [f"{section}.{n}" for n in fields]
            raise ValueError(
                f"unknown config key '{key}'.{_closest(key, section_keys)} "
                f"Valid keys in '{section}': {', '.join(section_keys)}"
            )
        setattr(obj, name, _convert(value, typing.get_type_hints(type(obj))[name], key))


def flatten_keys(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-3}} → {'train.lr': 1e-3}; a section that is not a mapping is a ValueError."""
    if not isinstance(tree, dict):
        raise ValueError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {short_repr(tree)}")
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten_keys(v, key + "."))
        else:
            flat[key] = v
    return flat


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--train.lr=3e-4', '--data.name', 'celeba'] -> {'train.lr': '3e-4', 'data.name': 'celeba'};
    a key given twice takes its last value, as argparse options do (scripts append overrides)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"expected an override like --train.lr=3e-4, got '{arg}'")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = arg[2:], args[i + 1]
            i += 1
        else:
            raise ValueError(f"override '{arg}' has no value; write it as {arg}=VALUE")
        out[key] = value
        i += 1
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file at `path`, then dotted `overrides`; validated."""
    cfg = Config()
    flat: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"config file '{path}' is a directory; pass a YAML file such as configs/polygons.yaml")
        if not path.is_file():
            raise FileNotFoundError(f"config file '{path}' does not exist; see configs/ for examples")
        tree = read_yaml(path, "config file")
        flat.update(flatten_keys(tree))
    flat.update(overrides or {})
    _apply(cfg, flat)
    validate(cfg)
    return cfg


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A validated copy of cfg with dotted overrides applied."""
    cfg = config_from_dict(config_to_dict(cfg))
    _apply(cfg, dict(overrides))
    validate(cfg)
    return cfg


YAML_MAX_VALUES = 10_000  # a config holds about 100; aliases that expand past this are a YAML bomb


class DuplicateKeyError(ValueError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
            if first != key_node.start_mark.line + 1:
                raise DuplicateKeyError(f"key {short_repr(key)} appears twice in one mapping (lines {first} and "
                                        f"{key_node.start_mark.line + 1}); PyYAML would keep only the second. Merge "
                                        f"them into one")
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values `node` stands for once its aliases are expanded (shared nodes counted once each time)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise ValueError("an alias refers to a value that contains it (a recursive structure)")
    open_nodes.add(id(node))
    children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                else node.value if isinstance(node, yaml.SequenceNode) else [])
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, open_nodes)
        if total > YAML_MAX_VALUES:
            break
    open_nodes.discard(id(node))
    sizes[id(node)] = total
    return total


def load_yaml_text(text: str) -> Any:
    """yaml.safe_load with duplicate keys refused and alias expansion bounded (ValueError / yaml.YAMLError)."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > YAML_MAX_VALUES:
            raise ValueError(f"its aliases (*name) expand to more than {YAML_MAX_VALUES:,} values (a YAML bomb?); "
                             f"write the values out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's contents, or a one-line ValueError naming the file (unreadable, not UTF-8, not YAML,
    a duplicated key, aliases that expand too far)."""
    try:
        return load_yaml_text(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} '{path}' is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except ValueError as e:  # a duplicated key, an alias bomb
        raise ValueError(f"{what} '{path}': {e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ValueError(f"{what} '{path}' is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} '{path}': {e.strerror}") from None


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config from `config_to_dict` output (e.g. from a bundle)."""
    cfg = Config()
    flat = flatten_keys(tree)
    # Saved configs hold every field, so a missing data.split means one written before it existed,
    # when folders were always hashed; reading it as auto could move images between splits.
    if "data.name" in flat:
        flat.setdefault("data.split", "hash")
    _apply(cfg, flat)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    tree = dataclasses.asdict(cfg)
    tree["train"]["betas"] = list(cfg.train.betas)
    return tree


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def drawn_steps(r: RefineConfig) -> int:
    """Evaluations for codes a prior drew: refine.sample_steps where set, else refine.steps; none
    when refine.steps is 0, which turns all refinement off."""
    return r.sample_steps if r.steps > 0 and r.sample_steps > 0 else r.steps


def check_refine(r: RefineConfig) -> None:
    """The refine section's checks: validate runs them on a config, refinement on the settings it
    is handed (which a library caller may have built by hand)."""
    checks = [
        (r.optimizer in CHOICES["refine.optimizer"],
         f"refine.optimizer must be one of {', '.join(CHOICES['refine.optimizer'])}, got {short_repr(r.optimizer)}"),
        (r.steps >= 0, f"refine.steps={r.steps} must be >= 0 (0 turns refinement off)"),
        (r.sample_steps >= 0, f"refine.sample_steps={r.sample_steps} must be >= 0 (0: as refine.steps)"),
        (r.batch_size > 0, f"refine.batch_size={r.batch_size} must be > 0"),
        (all(math.isfinite(v) and v >= 0
             for v in (r.lr, r.weighting, r.anchor, r.tv, r.sample_tv, r.latent_spread, r.balance)) and r.lr > 0,
         "refine.lr must be > 0, and refine.weighting, anchor, tv, sample_tv, latent_spread and balance >= 0 (all finite)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def validate(cfg: Config) -> None:
    """Reject bad values before any work starts."""
    from scatgen.prior import PRIOR_KINDS, VELOCITY_FIELDS

    for key, choices in {**CHOICES, "prior.kind": PRIOR_KINDS, "prior.conditioning": tuple(VELOCITY_FIELDS)}.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ValueError(f"config key '{key}': got {short_repr(value)}, expected one of {', '.join(choices)}")
    d, e, w, t, p, r = cfg.data, cfg.encoder, cfg.whitening, cfg.train, cfg.prior, cfg.refine
    checks = [
        (d.image_size >= 8 and d.image_size % (2**e.J) == 0,
         f"data.image_size={d.image_size} must be a multiple of 2^J={2**e.J} (encoder.J={e.J})"),
        (d.name != "polygons" or d.image_size in (32, 64, 128),
         f"data.image_size={d.image_size}: polygons come in 32, 64 or 128"),
        (d.name == "polygons" or d.root != "", f"data.name={d.name} needs data.root, the dataset directory"),
        (d.name != "polygons" or (d.num_train > 0 and d.num_test > 0),
         "polygons need data.num_train > 0 and data.num_test > 0"),
        (0.0 < d.test_fraction < 1.0, f"data.test_fraction={d.test_fraction} must be in (0, 1)"),
        (d.split != "folders" or d.name == "folder",
         f"data.split=folders applies to data.name=folder, not {d.name}; remove it or set data.split=auto"),
        (d.crop >= 0, f"data.crop={d.crop} must be >= 0"),
        (1 <= e.J <= 8, f"encoder.J={e.J} must be between 1 and 8"),
        (1 <= e.L <= 16, f"encoder.L={e.L} must be between 1 and 16"),
        (e.batch_size > 0, f"encoder.batch_size={e.batch_size} must be > 0"),
        (w.d > 0, f"whitening.d={w.d} must be > 0"),
        (w.power_iters >= 0 and w.oversample >= 0, "whitening.power_iters and whitening.oversample must be >= 0"),
        (math.isfinite(w.eps) and 0 <= w.eps < 1, f"whitening.eps={w.eps} must be a finite number in [0, 1)"),
        (math.isfinite(w.spill_gb) and w.spill_gb >= 0, f"whitening.spill_gb={w.spill_gb} must be a finite number "
                                                         f">= 0 (0 = rescatter)"),
        (w.max_images >= 0, f"whitening.max_images={w.max_images} must be >= 0 (0 = all)"),
        (math.isfinite(t.lr) and t.lr > 0, f"train.lr={t.lr} must be a finite number > 0"),
        (all(0.0 <= b < 1.0 for b in t.betas), f"train.betas={list(t.betas)}: each must be in [0, 1)"),
        (math.isfinite(t.weight_decay) and t.weight_decay >= 0,
         f"train.weight_decay={t.weight_decay} must be a finite number >= 0"),
        (math.isfinite(t.grad_clip) and t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0 (0 = off)"),
        (math.isfinite(t.max_minutes) and t.max_minutes >= 0, f"train.max_minutes={t.max_minutes} must be >= 0"),
        (t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0"),
        (t.num_workers >= 0, f"train.num_workers={t.num_workers} must be >= 0 (0 = load in the main process)"),
        (t.eval_images >= 1, f"train.eval_images={t.eval_images} must be >= 1"),
        (t.grid_size >= 1, f"train.grid_size={t.grid_size} must be >= 1"),
        (0 <= cfg.run.seed < 2**32, f"run.seed={cfg.run.seed} must be in [0, 2^32)"),
        (0 <= d.seed < 2**32, f"data.seed={d.seed} must be in [0, 2^32)"),
        (d.num_train >= 0 and d.num_test >= 0, "data.num_train and data.num_test must be >= 0 (0 = all)"),
        (0.0 <= t.code_noise < 1.0, f"train.code_noise={t.code_noise} must be in [0, 1)"),
        (t.batch_size > 0, f"train.batch_size={t.batch_size} must be > 0"),
        (t.max_steps > 0 or t.epochs > 0, "set train.max_steps > 0 or train.epochs > 0"),
        (min(t.eval_every, t.log_every, t.checkpoint_every, t.keep_checkpoints) > 0,
         "train.eval_every, log_every, checkpoint_every and keep_checkpoints must be > 0"),
        (min(p.components, p.width, p.depth, p.fit_steps, p.batch_size, p.sample_steps, p.latent,
             p.autoencoder_steps) > 0,
         "prior.components, width, depth, fit_steps, batch_size, sample_steps, latent and autoencoder_steps "
         "must be > 0"),
        (math.isfinite(p.sde_noise) and p.sde_noise >= 0,
         f"prior.sde_noise={p.sde_noise} must be a finite number >= 0 (0 = the ODE sampler)"),
        (p.autoencoder_width >= 0, f"prior.autoencoder_width={p.autoencoder_width} must be >= 0 (0 = prior.width)"),
        (p.kind != "latent_flow" or p.latent < w.d,
         f"prior.latent={p.latent} must be below whitening.d={w.d}: the latent compresses the codes"),
        (math.isfinite(p.lr) and p.lr > 0, f"prior.lr={p.lr} must be a finite number > 0"),
        (math.isfinite(p.max_minutes) and p.max_minutes >= 0,
         f"prior.max_minutes={p.max_minutes} must be a finite number >= 0 (0 = no time limit)"),
        (math.isfinite(p.code_weighting) and 0 <= p.code_weighting <= 2,
         f"prior.code_weighting={p.code_weighting} must be a number in [0, 2] (0 = plain whitened error)"),
        (math.isfinite(p.latent_noise) and 0 <= p.latent_noise <= 1,
         f"prior.latent_noise={p.latent_noise} must be a number in [0, 1] (the latents' spread; 0 = none)"),
        (p.dims >= 0, f"prior.dims={p.dims} must be >= 0 (0, or more than whitening.d, models all components)"),
        (math.isfinite(p.ema) and 0 <= p.ema < 1, f"prior.ema={p.ema} must be in [0, 1) (0 = no moving average)"),
        (math.isfinite(p.guide_at) and 0 <= p.guide_at < 1,
         f"prior.guide_at={p.guide_at} must be in [0, 1): the fraction of the flow's fit at which its guide is kept (0 = none)"),
        (math.isfinite(p.guidance) and p.guidance >= 1,
         f"prior.guidance={p.guidance} must be a finite number >= 1 (1 = no guidance)"),
        (p.guidance == 1 or p.guide_at > 0,
         f"prior.guidance={p.guidance} guides the flow by an earlier copy of itself, and prior.guide_at=0 keeps none; "
         f"set prior.guide_at (e.g. 0.25) or prior.guidance=1"),
        (math.isfinite(cfg.run.max_minutes) and cfg.run.max_minutes >= 0,
         f"run.max_minutes={cfg.run.max_minutes} must be a finite number >= 0 (0 = no run budget)"),
        (cfg.run.max_minutes == 0 or t.max_minutes == 0 or cfg.run.max_minutes > t.max_minutes,
         f"run.max_minutes={cfg.run.max_minutes} must exceed train.max_minutes={t.max_minutes}, G's share of it, "
         f"to leave time for the prior and the pictures"),
        (cfg.run.resume in ("", "latest") or Path(cfg.run.resume).exists(),
         f"run.resume='{cfg.run.resume}': expected '', 'latest' or an existing checkpoint folder"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    check_refine(r)
    scattering_dim = 3 * scattering_channels(e.J, e.L) * (d.image_size // 2**e.J) ** 2
    if w.d > scattering_dim:
        raise ValueError(f"whitening.d={w.d} exceeds the scattering dimension D={scattering_dim}; lower it")
    cfg.generator.validate()
    cfg.generator.check_image_size(d.image_size, e.J)
