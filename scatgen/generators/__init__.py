"""Generators: whitened codes (B, d) → images (B, 3, N, N) in [-1, 1].

Each kind lives in its own module and registers a (Config, Module) pair here.
Adding a generator is one new file plus one line in `_KINDS`; the trainer never
changes, because every generator has the same `forward(codes, targets=None, loss=...)`.
"""

from __future__ import annotations

import importlib

from scatgen.generators.base import Generator, GeneratorConfig

# kind -> "module:ConfigClass:ModuleClass"; imported lazily so a broken optional kind
# never stops the others from loading.
_KINDS = {
    "gsn": "scatgen.generators.gsn:GSNConfig:GSNGenerator",
    "sparse_deconv": "scatgen.generators.sparse_deconv:SparseDeconvConfig:SparseDeconvGenerator",
}


def _lookup(kind: str) -> tuple[type, type]:
    if kind not in _KINDS:
        raise ValueError(f"unknown generator.kind '{kind}'; expected one of {', '.join(_KINDS)}")
    module, config_name, class_name = _KINDS[kind].split(":")
    mod = importlib.import_module(module)
    return getattr(mod, config_name), getattr(mod, class_name)


def generator_config_class(kind: str) -> type:
    return _lookup(kind)[0]


def build_generator(cfg: GeneratorConfig, code_dim: int, image_size: int, J: int, L: int) -> Generator:
    """Instantiate the generator that `cfg.kind` names."""
    _, cls = _lookup(cfg.kind)
    return cls(cfg, code_dim=code_dim, image_size=image_size, J=J, L=L)


__all__ = ["Generator", "GeneratorConfig", "build_generator", "generator_config_class"]
