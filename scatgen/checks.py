"""Checks of what callers pass to the Pipeline and the commands: one place, one-line errors that
name the problem and the fix (TypeError for a wrong kind of value, ValueError for a bad one)."""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from typing import Any

import torch

from scatgen.utils import short_repr

SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes 64-bit seeds; callers add small offsets to them
RANGE_TOLERANCE = 1e-4  # float rounding of images that are in [-1, 1]


class ImageRangeWarning(UserWarning):
    """Images that lie in [0, 1]: legal values, but most likely ToTensor's scale, not scatgen's [-1, 1]."""


def _tensor(value: Any, what: str, example: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    kind = f"{type(value).__module__}.{type(value).__name__}".removeprefix("builtins.")
    hint = "torch.from_numpy(x)" if kind.startswith("numpy.") else "torch.as_tensor(x)"
    raise TypeError(f"{what} must be a torch.Tensor {example}, got a {kind}; convert it with {hint}")


def _nonfinite(x: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = bad.flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{what} hold {int(bad.sum())} NaN or infinite value(s) (in item(s) "
                         f"{short_repr(rows)}); they would decode to NaN images: fix or drop those items")


def check_images(images: Any, image_size: int) -> torch.Tensor:
    """Images (B, 3, N, N) as float32 in [-1, 1]. uint8 images (0–255) are converted explicitly
    (v / 127.5 − 1, as the datasets do); float images outside [-1, 1] and non-finite pixels are
    refused; images that all lie in [0, 1] pass with an ImageRangeWarning. B may be 0."""
    n = image_size
    images = _tensor(images, "images", f"of shape (B, 3, {n}, {n}) in [-1, 1]")
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, n, n):
        hint = "; add the batch dimension with images[None]" if tuple(images.shape) == (3, n, n) else ""
        raise ValueError(f"expected images of shape (B, 3, {n}, {n}), got {tuple(images.shape)}{hint}")
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1
    if not images.is_floating_point() or images.is_complex():
        raise TypeError(f"images of dtype {images.dtype}: pass float images in [-1, 1], or uint8 images (0–255), "
                        f"which are converted with v / 127.5 − 1")
    images = images.float()
    if images.numel() == 0:
        return images
    _nonfinite(images, "the images")
    low, high = images.min().item(), images.max().item()
    if low < -1 - RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        hint = ("they look like 0–255 values: pass images / 127.5 - 1, or the uint8 tensor itself"
                if high > 2 else "rescale them to [-1, 1]")
        raise ValueError(f"images must lie in [-1, 1], got values in [{low:.4g}, {high:.4g}]; {hint}")
    if low >= 0 and high > 0:
        warnings.warn(f"every pixel of these images is in [0, 1] (range [{low:.3g}, {high:.3g}]), but scatgen "
                      f"expects [-1, 1]: if they come from torchvision's ToTensor, pass images * 2 - 1",
                      ImageRangeWarning, stacklevel=3)
    return images.clamp(-1, 1)


def check_codes(codes: Any, d: int) -> torch.Tensor:
    """Codes (B, d) as float32 (any floating dtype is converted); integer, bool or complex
    codes and non-finite values are refused. B may be 0."""
    codes = _tensor(codes, "codes", f"of shape (B, {d})")
    if codes.ndim != 2 or codes.shape[1] != d:
        raise ValueError(f"expected codes of shape (B, {d}), got {tuple(codes.shape)}")
    if not codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"codes must be a floating-point tensor, got dtype {codes.dtype}; codes are real numbers "
                        f"(pipe.encode or pipe.random_codes make them): pass codes.float() if you mean these values")
    codes = codes.float()
    if codes.numel():
        _nonfinite(codes, "the codes")
    return codes


def check_code_or_image(value: Any, d: int, image_size: int, what: str) -> torch.Tensor:
    """One code (d,) or one image (3, N, N), checked as check_codes / check_images check a batch."""
    n = image_size
    value = _tensor(value, what, f"(a code ({d},) or an image (3, {n}, {n}))")
    if value.ndim == 3:
        return check_images(value[None], image_size)[0]
    if value.ndim == 1:
        return check_codes(value[None], d)[0]
    raise ValueError(f"{what} must be a code ({d},) or an image (3, {n}, {n}), got shape {tuple(value.shape)}")


def whole_number(value: Any, name: str, minimum: int = 0, maximum: int | None = None) -> int:
    """`value` as an int in [minimum, maximum]; bools and floats are refused (2.5 steps means nothing)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a whole number, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a whole number, got {short_repr(value)} "
                        f"({type(value).__name__})") from None
    if number < minimum or (maximum is not None and number > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {short_repr(number)}")
    return number


def check_seed(seed: Any) -> int:
    """A seed in [0, 2^63): what torch's generators take."""
    number = whole_number(seed, "seed", 0)
    if number >= SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2^63), got {short_repr(number)}; pick a smaller seed")
    return number


def positive_number(value: Any, name: str, zero: bool = False) -> float:
    """A finite real number > 0 (temperature and the like), or >= 0 with `zero`."""
    bound = ">= 0" if zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number {bound}, got {short_repr(value)}")
    number = float(value)
    if not (math.isfinite(number) and (number > 0 or zero and number == 0)):
        raise ValueError(f"{name} must be a finite number {bound}, got {number}")
    return number


def check_strength(strength: Any) -> float:
    """A variation strength: a number in [0, 1] (0 = the image itself, 1 = a fresh sample)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ValueError(f"variation strength must be a number in [0, 1] (0 = the image itself, "
                         f"1 = a fresh sample), got {strength!r}")
    return float(strength)


def check_dims(dims: Any, d: int) -> int | None:
    """None (all d components) or a count in [0, d] of the leading code components refinement targets."""
    if dims is None:
        return None
    return whole_number(dims, "dims (the leading code components refinement targets; None = all)", 0, d)


def check_device(device: Any) -> torch.device:
    """A torch.device that exists on this machine: 'cpu', 'cuda', 'cuda:N', 'mps'."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda', or a torch.device; got "
                        f"{short_repr(device)}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N (N the GPU's index) or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: torch sees no CUDA GPU here (torch.cuda.is_available() is "
                             f"False); use --device cpu / device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"numbered from 0")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {str(device)!r}: Apple's MPS backend is not available here; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(device)!r}: scatgen runs on cpu, cuda or mps")
    return dev
