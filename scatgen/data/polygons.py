"""Procedural polygons: one random filled polygon on a random background per image.

``PolygonDataset[i]`` is a float32 tensor (3, N, N) in [-1, 1], N in {32, 64, 128}.
It never returns None (there are no files) and ``path(i)`` is always None.

Determinism: image i depends only on (seed, global index). All randomness comes
from ``numpy.random.default_rng([seed, global_index])`` (a SeedSequence of the
pair, PCG64), which is platform-independent, and the shape is rasterised with
Pillow's ``ImageDraw`` at 4× resolution and downsampled with a 4×4 box filter
(``Image.reduce(4)``) for anti-aliasing. The same image comes out on every
machine, call, process and DataLoader worker.

Splits: train item i is global index i; test item i is global index
``TEST_OFFSET + i`` with ``TEST_OFFSET = 10**9``, so the splits never overlap
(as long as num_train < 10**9). Lengths are cfg.num_train / cfg.num_test, which
must be > 0 (there is no "all" for a procedural set).

Each image: a polygon with 3–8 vertices, either convex (vertices on a circle at
jittered, sorted angles: a convex cyclic polygon) or star-shaped (3–8 points:
2k vertices alternating between the outer radius and a random inner radius of
0.3–0.6 of it). Random rotation, outer radius 0.2–0.42 of the image side and a
centre that keeps the whole shape inside the frame. Background and fill colours
are uniform RGB, resampled until their Euclidean RGB distance is ≥ MIN_CONTRAST.
Crop is not used (identity reports crop = 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from scatgen.data.images import _normalize_index, to_tensor

__all__ = ["PolygonDataset", "render_polygon", "TEST_OFFSET", "SIZES"]

TEST_OFFSET = 10**9
SIZES = (32, 64, 128)
SUPERSAMPLE = 4
MIN_CONTRAST = 120.0  # Euclidean RGB distance (of a max ≈ 441.7) between fill and background
VERSION = 2  # bump when the drawing changes, so caches keyed on identity() invalidate


NUM_COLOUR_TRIES = 16


def _colours(u: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Background and fill from 3·(1 + NUM_COLOUR_TRIES) uniforms in [0, 1)."""
    c = (u * 256).astype(np.int64).reshape(-1, 3).tolist()
    bg = c[0]
    for fg in c[1:]:
        if sum((a - b) ** 2 for a, b in zip(fg, bg)) >= MIN_CONTRAST**2:
            break
    else:  # the opposite corner of the RGB cube: distance >= 128·√3
        fg = [0 if v >= 128 else 255 for v in bg]
    return tuple(bg), tuple(fg)


def render_polygon(seed: int, index: int, image_size: int) -> Image.Image:
    """The RGB image (image_size²) for global index `index` under `seed`."""
    if image_size not in SIZES:
        raise ValueError(f"polygons: image_size must be one of {SIZES}, got {image_size}")
    rng = np.random.default_rng([int(seed), int(index)])
    nc = 3 * (1 + NUM_COLOUR_TRIES)
    u = rng.random(nc + 7 + 16)  # colours, 7 shape scalars, up to 16 vertex jitters (one draw)
    bg, fg = _colours(u[:nc])
    star_u, k_u, rot_u, inner_u, size_u, cx_u, cy_u = u[nc:nc + 7].tolist()
    jitter = u[nc + 7:]
    star = bool(star_u < 0.5)
    k = 3 + int(k_u * 6)  # vertices (convex) or points (star): 3..8
    rotation = rot_u * 2 * math.pi
    n = 2 * k if star else k
    step = 2 * math.pi / n
    angles = rotation + step * (np.arange(n) + (jitter[:n] - 0.5) * (0.3 if star else 0.6))
    if star:
        radii = np.where(np.arange(n) % 2 == 0, 1.0, 0.3 + 0.3 * inner_u)
    else:
        radii = np.ones(n)
    side = image_size * SUPERSAMPLE
    outer = side * (0.2 + 0.22 * size_u)
    cx = outer + cx_u * (side - 2 * outer)
    cy = outer + cy_u * (side - 2 * outer)
    xs = (cx + outer * radii * np.cos(angles)).tolist()
    ys = (cy + outer * radii * np.sin(angles)).tolist()
    img = Image.new("RGB", (side, side), bg)
    ImageDraw.Draw(img).polygon(list(zip(xs, ys)), fill=fg)
    return img.reduce(SUPERSAMPLE)


class PolygonDataset(torch.utils.data.Dataset):
    """`length` procedural polygon images; item i is global index `offset + i` (see module doc)."""

    name = "polygons"

    def __init__(self, split: str, image_size: int, seed: int, length: int) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be one of ['train', 'test'], got {split!r}")
        if image_size not in SIZES:
            raise ValueError(f"polygons: image_size must be one of {SIZES}, got {image_size}")
        if seed < 0:
            raise ValueError(f"polygons: seed must be >= 0, got {seed}")
        if length <= 0:
            raise ValueError(f"polygons: num_{split} must be > 0 (there is no 'all'), got {length}")
        if split == "train" and length > TEST_OFFSET:
            raise ValueError(f"polygons: num_train must be <= {TEST_OFFSET} to stay disjoint from test")
        self.split = split
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.length = int(length)
        self.offset = 0 if split == "train" else TEST_OFFSET

    def __len__(self) -> int:
        return self.length

    def global_index(self, i: int) -> int:
        return self.offset + _normalize_index(i, self.length)

    def path(self, i: int) -> None:
        """Always None: polygons have no files (the index is still checked)."""
        _normalize_index(i, self.length)
        return None

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_tensor(render_polygon(self.seed, self.global_index(i), self.image_size))

    def identity(self) -> dict:
        return dict(name=self.name, split=self.split, image_size=self.image_size, crop=0, seed=self.seed,
                    count=self.length, offset=self.offset, version=VERSION)

    def __repr__(self) -> str:
        return f"PolygonDataset(split={self.split!r}, n={self.length}, image_size={self.image_size}, seed={self.seed})"
