"""Shared image helpers: decode a file to RGB, centre crop + resize, convert to a tensor.

Conventions used by every dataset in `scatgen.data`:

* Images are float32 tensors of shape (3, N, N) with values in [-1, 1]
  (uint8 value v maps to v / 127.5 - 1, so 0 → -1.0 and 255 → +1.0 exactly).
* Colour modes: grayscale ("1", "L", 16-bit "I;16"/"I", float "F"), palette ("P"),
  CMYK, YCbCr, ... are converted to RGB. Images with an alpha channel (RGBA, LA,
  PA, or a palette / grayscale image with a transparency key) are **composited on
  a white background**, not alpha-dropped, so transparent areas do not turn into
  whatever colour the encoder left under them (often black).
* The EXIF orientation tag is applied (photos from phones come out upright).
  Animated files (GIF / WebP) use their first frame.
* Geometry: a square centre crop of side `crop` (clamped to the shorter side;
  `crop <= 0` means the shorter side), then a resize to N×N with Pillow's
  antialiased **LANCZOS** filter (Pillow widens the kernel by the scale factor
  when downsampling, so it is a proper low-pass). The crop box is
  ``left = (w - c) // 2, top = (h - c) // 2``. (`load_image` alone uses an
  image that is already N×N as is.)
* Corrupt data: decoding happens inside a try that catches Pillow's truncated-file
  errors (OSError), `UnidentifiedImageError` (an OSError), `Image.DecompressionBombError`,
  SyntaxError, ValueError, EOFError and struct.error. `img.load()` forces the
  full decode so a truncated file fails here and not later.
  `ImageFile.LOAD_TRUNCATED_IMAGES` is never changed.
  `try_load_tensor` turns such a failure into a `CorruptImageWarning` naming the
  file and returns None; `load_image` turns it into a ValueError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "DECODE_ERRORS",
    "CorruptImageWarning",
    "read_rgb",
    "center_crop_resize",
    "to_tensor",
    "try_load_tensor",
    "load_image",
    "is_image_file",
    "file_list_hash",
    "FileImageDataset",
]

#: File extensions (lower case) recognised as images by the file datasets.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")

#: Exceptions that mean "this file cannot be decoded" (never a bare except).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,  # raised by some Pillow plugins for malformed headers
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)

RESAMPLE = Image.Resampling.LANCZOS


class CorruptImageWarning(UserWarning):
    """An image file could not be decoded and was skipped (the message names the file)."""


def is_image_file(name: str | os.PathLike) -> bool:
    """True for names ending in one of IMAGE_EXTENSIONS (case-insensitive)."""
    return os.fspath(name).lower().endswith(IMAGE_EXTENSIONS)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB; alpha is composited on white."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        elif mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0
        arr = np.nan_to_num(arr, nan=0.0)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        return img.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode and convert `path` to an RGB image.

    Raises whatever Pillow raises for a bad file (one of DECODE_ERRORS) and
    FileNotFoundError for a missing one; callers decide how to report it.
    """
    with Image.open(path) as img:
        img.load()  # force the full decode: truncated data fails here
        try:
            oriented = ImageOps.exif_transpose(img)
        except (*DECODE_ERRORS, KeyError, TypeError, ZeroDivisionError):
            oriented = img  # a malformed EXIF block must not reject a good image
        rgb = _to_rgb(oriented if oriented is not None else img)
        if rgb is img:
            rgb = img.copy()  # detach from the file before it is closed
    return rgb


def center_crop_resize(img: Image.Image, image_size: int, crop: int = 0) -> Image.Image:
    """Square centre crop of side `crop` (<= 0 or too large → the shorter side), resize to image_size².

    Resizing uses antialiased LANCZOS; an image already of the target size after
    the crop is not resampled.
    """
    w, h = img.size
    side = min(w, h)
    c = side if crop <= 0 else min(int(crop), side)
    if c != w or c != h:
        left, top = (w - c) // 2, (h - c) // 2
        img = img.crop((left, top, left + c, top + c))
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), RESAMPLE)
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → contiguous float32 tensor (3, H, W) in [-1, 1]."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    out = arr.transpose(2, 0, 1).astype(np.float32, order="C")  # a fresh C-contiguous copy
    np.divide(out, np.float32(127.5), out=out)
    out -= np.float32(1.0)  # 0 → -1.0, 255 → 1.0 exactly
    return torch.from_numpy(out)


def try_load_tensor(path: Path, image_size: int, crop: int = 0) -> torch.Tensor | None:
    """Dataset loader: the (3, N, N) tensor in [-1, 1], or None + CorruptImageWarning for a bad file.

    A file that vanished since the dataset was indexed is reported the same way
    (it cannot be read), so a long run is not killed by one missing file.
    """
    try:
        img = read_rgb(path)
    except DECODE_ERRORS as e:  # FileNotFoundError is an OSError too
        warnings.warn(
            f"skipping corrupt or unreadable image {path}: {type(e).__name__}: {e}",
            CorruptImageWarning,
            stacklevel=3,
        )
        return None
    return to_tensor(center_crop_resize(img, image_size, crop))


def load_image(path: str | os.PathLike, image_size: int, crop: int = 0) -> torch.Tensor:
    """Load a user-given image file as a float32 tensor (3, image_size, image_size) in [-1, 1].

    The image goes through the same preprocessing as the datasets: to RGB (alpha
    on white), then, unless it is already image_size², a square centre crop of
    side `crop` (0 → the shorter side; clamped to the shorter side) and an
    antialiased LANCZOS resize. Pass the dataset's effective crop (see
    `scatgen.data.default_crop`) to match its preprocessing exactly.

    Raises FileNotFoundError if `path` does not exist or is not a file, and
    ValueError naming the file if it cannot be decoded.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"image file not found: {p}")
    if not p.is_file():
        raise FileNotFoundError(f"not a regular file: {p}")
    if int(image_size) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    try:
        img = read_rgb(p)
    except DECODE_ERRORS as e:
        raise ValueError(f"cannot read image {p}: {type(e).__name__}: {e}") from e
    if img.size == (int(image_size), int(image_size)):
        return to_tensor(img)
    return to_tensor(center_crop_resize(img, int(image_size), int(crop)))


def _normalize_index(i, n: int) -> int:
    """Sequence-style index check: negative indices count from the end; else IndexError."""
    i = operator.index(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"index {i} out of range for a dataset of {n} images")
    return i


def file_list_hash(root: Path, files: list[Path]) -> str:
    """Short sha256 of the sorted (relative POSIX path, size, mtime_ns) list of `files` under `root`.

    A file that cannot be stat'ed contributes (path, -1, -1), so its later
    appearance also changes the hash.
    """
    rows = []
    for f in files:
        try:
            st = f.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        rows.append((f.relative_to(root).as_posix(), size, mtime))
    rows.sort()
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()[:16]


class FileImageDataset(torch.utils.data.Dataset):
    """Base of the file datasets: a fixed, sorted list of image files under `root`.

    ``dataset[i]`` is a float32 tensor (3, N, N) in [-1, 1], or None (with a
    CorruptImageWarning naming the file) when the file cannot be decoded.
    ``path(i)`` is the absolute Path of item i. ``identity()`` is a JSON-able dict
    of everything that determines the images, including a short hash of the
    (relative path, size, mtime_ns) list, recomputed on every call.
    """

    name = "files"

    def __init__(self, root: Path, files: list[Path], split: str, image_size: int, crop: int,
                 seed: int = 0, extra: dict | None = None) -> None:
        self.root = Path(root)
        self.files = list(files)
        self.split = split
        self.image_size = int(image_size)
        self.crop = int(crop)
        self.seed = int(seed)
        self._extra = dict(extra or {})

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.files[_normalize_index(i, len(self.files))]

    def __getitem__(self, i: int) -> torch.Tensor | None:
        return try_load_tensor(self.path(i), self.image_size, self.crop)

    def identity(self) -> dict:
        return dict(
            name=self.name,
            split=self.split,
            root=str(self.root),
            image_size=self.image_size,
            crop=self.crop,
            seed=self.seed,
            count=len(self.files),
            files=file_list_hash(self.root, self.files),
            **self._extra,
        )

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, n={len(self)}, root={str(self.root)!r}, "
                f"image_size={self.image_size}, crop={self.crop})")
