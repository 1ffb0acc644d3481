"""The Morlet filter bank of an order-2 2D scattering, as pure functions.

The filters are kymatio's (``kymatio.scattering2d.filter_bank``), in the Fourier domain,
for the padded size kymatio uses (:func:`compute_padding`). :func:`load_filter_bank`
returns them as plain float32 tensors, built once per (J, L, padded shape) and
optionally cached on disk; nothing here holds state. kymatio is imported only on a
cache miss.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from scatgen.utils import atomic_path, cache_key

__all__ = [
    "scattering_channels",
    "channel_orders",
    "compute_padding",
    "filter_bank_key",
    "build_filter_bank",
    "load_filter_bank",
]

_CACHE_FORMAT = "kymatio-0.3-morlet2d-v1"


def scattering_channels(J: int, L: int) -> int:
    """K = 1 + J·L + L²·J(J−1)/2 channels per input map (order 0, 1, 2)."""
    return 1 + J * L + L * L * J * (J - 1) // 2


def channel_orders(J: int, L: int) -> torch.Tensor:
    """The scattering order (0, 1 or 2) of each of the K channels, in kymatio's channel order."""
    return torch.tensor([0] + [1] * (J * L) + [2] * (L * L * J * (J - 1) // 2))


def compute_padding(M: int, N: int, J: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """kymatio's padded size and (top, bottom, left, right) reflect padding.

    Padded size = (⌊(M + 2^J)/2^J⌋ + 1)·2^J: a multiple of 2^J with ≥ 2^J margin, so
    that after subsampling by 2^J one row/column is dropped on each side (unpad).
    """
    Mp = ((M + 2**J) // 2**J + 1) * 2**J
    Np = ((N + 2**J) // 2**J + 1) * 2**J
    pads = ((Mp - M) // 2, (Mp - M + 1) // 2, (Np - N) // 2, (Np - N + 1) // 2)
    return (Mp, Np), pads


def filter_bank_key(J: int, L: int, padded_shape: tuple[int, int]) -> str:
    """Short hash naming the filter bank of (J, L, padded shape) in the disk cache."""
    return cache_key({"format": _CACHE_FORMAT, "J": J, "L": L, "shape": [padded_shape[0], padded_shape[1]]})


def _kymatio_filter_bank(M: int, N: int, J: int, L: int) -> dict:
    # Imported lazily: kymatio builds its filters in Python loops, which is slow and
    # only needed on a cache miss. `kymatio.torch` fails to import with scipy >= 1.17.
    from kymatio.scattering2d.filter_bank import filter_bank

    return filter_bank(M, N, J, L)


def build_filter_bank(J: int, L: int, padded_shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """kymatio's Fourier-domain Morlet filters as plain float32 tensors.

    Returns ``{"psi_{j}_{res}": (L, Mp/2^res, Np/2^res)}`` for every scale j and
    resolution res kymatio builds, and ``{"phi_{res}": (Mp/2^res, Np/2^res)}``.
    """
    Mp, Np = padded_shape
    fb = _kymatio_filter_bank(Mp, Np, J, L)
    out: dict[str, torch.Tensor] = {}
    for j in range(J):
        psis = [p for p in fb["psi"] if p["j"] == j]
        assert [p["theta"] for p in psis] == list(range(L))
        for res in range(len(psis[0]["levels"])):
            stack = np.stack([np.asarray(p["levels"][res], dtype=np.float32) for p in psis])
            out[f"psi_{j}_{res}"] = torch.from_numpy(stack).contiguous()
    for res, level in enumerate(fb["phi"]["levels"]):
        out[f"phi_{res}"] = torch.from_numpy(np.asarray(level, dtype=np.float32)).contiguous()
    return out


def load_filter_bank(
    J: int, L: int, padded_shape: tuple[int, int], cache_dir: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """The filter bank of (J, L, padded shape), from ``cache_dir`` when cached.

    A pure function of its arguments (plus the cache content). On a miss the bank is
    built with kymatio and, if ``cache_dir`` is given, written atomically to
    ``scattering2d_J{J}_L{L}_{Mp}x{Np}_{key}.safetensors``.
    """
    from safetensors.torch import load_file, save_file

    padded_shape = (int(padded_shape[0]), int(padded_shape[1]))
    if cache_dir is None:
        return build_filter_bank(J, L, padded_shape)
    path = Path(cache_dir) / (
        f"scattering2d_J{J}_L{L}_{padded_shape[0]}x{padded_shape[1]}_"
        f"{filter_bank_key(J, L, padded_shape)}.safetensors"
    )
    if path.exists():
        try:
            return load_file(str(path))
        except Exception:  # corrupt or truncated file: rebuild and overwrite it
            pass
    bank = build_filter_bank(J, L, padded_shape)
    with atomic_path(path) as tmp:
        save_file(bank, str(tmp), metadata={"format": _CACHE_FORMAT, "J": str(J), "L": str(L)})
    return bank
