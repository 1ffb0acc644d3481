"""scatgen: generative scattering networks.

image → scattering → whitening → code → (prior) → generator → (refinement) → image

The names below load on first use (a module-level __getattr__), so that `import scatgen.cli`,
the `scatgen` command's entry module, does not load torch: the command must set OpenMP's
environment first (scatgen/threads.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Config", "Pipeline", "load", "load_config", "__version__"]

_LAZY = {"Config": "scatgen.config", "load_config": "scatgen.config", "Pipeline": "scatgen.pipeline",
         "load": "scatgen.pipeline"}

if TYPE_CHECKING:  # for type checkers and editors, which do not run __getattr__
    from scatgen.config import Config, load_config
    from scatgen.pipeline import Pipeline, load


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'scatgen' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
