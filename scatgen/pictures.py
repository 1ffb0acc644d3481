"""images → PNG/GIF files: grids, side-by-side comparisons and interpolation strips, and the
pictures a finished run writes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torchvision.utils import make_grid

from scatgen.utils import atomic_path

if TYPE_CHECKING:
    from scatgen.pipeline import Pipeline

MAX_PIXELS = 50_000_000  # one picture: 600 MB as float32 RGB; a bigger one is a mistake, not a picture

# What a finished run draws: samples.png, then per prior a raw and a refined row; interpolation
# strips between pairs of test codes; rows of a test image and its variations.
SAMPLES, SAMPLES_PER_PRIOR = 64, 8
PAIRS, PATH_POINTS = 4, 10
VARIED, VARIATIONS = 4, 9


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1], clamped."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def _check_size(height: int, width: int) -> None:
    if height * width > MAX_PIXELS:
        raise ValueError(f"a picture of {width}×{height} pixels is too large to build (at most {MAX_PIXELS:,}); "
                         f"show fewer images, or wrap them into more rows")


def grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """images (B, 3, N, N) in [-1, 1] → one (3, H, W) picture in [0, 1]."""
    columns = max(1, min(nrow, len(images)))
    rows = -(-len(images) // columns)
    _check_size(rows * (images.shape[-2] + 2) + 2, columns * (images.shape[-1] + 2) + 2)
    return make_grid(to_unit(images), nrow=nrow, padding=2, pad_value=1.0)


def display_scale(image_size: int) -> int:
    """How much to enlarge pictures of N×N images: ×4 at 32², none from 128² on."""
    return max(1, 128 // image_size)


def enlarge(picture: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Nearest-neighbour upscaling of a (3, H, W) picture: 32² thumbnails hide blur."""
    if factor < 1:
        raise ValueError(f"the enlargement factor must be >= 1, got {factor}")
    _check_size(picture.shape[-2] * factor, picture.shape[-1] * factor)
    return picture.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def rows_grid(sets: list[torch.Tensor], nrow: int = 8) -> torch.Tensor:
    """Interleaved rows: nrow images of each set in turn (e.g. originals, G, refined), then the next nrow.
    A short last group is padded with white so that every row lines up."""
    nrow = min(nrow, len(sets[0]))
    rows = []
    for start in range(0, len(sets[0]), nrow):
        for images in sets:
            row = images[start:start + nrow]
            blank = torch.ones(nrow - len(row), *row.shape[1:], dtype=row.dtype)
            rows.append(torch.cat([row, blank]))
    return grid(torch.cat(rows), nrow=nrow)


def to_pil(picture: torch.Tensor) -> Image.Image:
    array = (picture.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def save_png(picture: torch.Tensor, path: str | Path) -> Path:
    """Save a (3, H, W) picture in [0, 1]."""
    path = Path(path)
    with atomic_path(path) as tmp:
        to_pil(picture).save(tmp, format="PNG")
    return path


def save_gif(images: torch.Tensor, path: str | Path, duration_ms: int = 120, scale: int = 1) -> Path:
    """An animation that runs through `images` (K, 3, N, N) in [-1, 1] and back."""
    frames = [to_pil(to_unit(im)) for im in images]
    if scale > 1:
        frames = [f.resize((f.width * scale, f.height * scale), Image.NEAREST) for f in frames]
    frames = frames + frames[-2:0:-1]
    path = Path(path)
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return path


def save_run_pictures(pipe: Pipeline, codes: torch.Tensor, images: torch.Tensor, folder: Path, seed: int) -> None:
    """The pictures a user looks at first, enlarged below 128²: reconstructions (rows of test
    images, G, refined), samples from the default prior, samples of every prior raw and refined,
    interpolations between test codes (through the prior where it is invertible) and variations
    of test images. `codes` are those of the test `images` (32 of each)."""
    from scatgen.refinement import refine_reconstructions

    refining = pipe.cfg.refine.steps > 0
    factor = display_scale(pipe.image_size)
    recons = pipe.decode(codes, refine=0)
    rows = [images, recons]
    if refining:
        rows.append(refine_reconstructions(pipe.scattering, recons, images, pipe.refine_settings()))
    save_png(enlarge(rows_grid(rows), factor), folder / "reconstructions.png")
    save_png(enlarge(grid(pipe.sample(SAMPLES, seed=seed)), factor), folder / "samples.png")
    by_prior = []
    for kind in pipe.priors:
        by_prior += [pipe.sample(SAMPLES_PER_PRIOR, seed=seed + 1, prior=kind, refine=0)]
        by_prior += [pipe.sample(SAMPLES_PER_PRIOR, seed=seed + 1, prior=kind)] if refining else []
    save_png(enlarge(grid(torch.cat(by_prior)), factor), folder / "samples-by-prior.png")
    pairs = min(PAIRS, len(codes) // 2)
    prior = pipe.priors[pipe.default_prior]
    path = pipe.interpolate_codes(codes[0:2 * pairs:2], codes[1:2 * pairs:2], torch.linspace(0, 1, PATH_POINTS),
                                  path=pipe.interpolation_path())
    strips = pipe.decode(path.flatten(0, 1), drawn_by=pipe.default_prior)
    save_png(enlarge(grid(strips, nrow=PATH_POINTS), factor), folder / "interpolation.png")
    if prior.invertible:
        # Rows: a test image's decoding, then its variations at strength 0.5 (drawn codes).
        varied = codes[:VARIED]
        variations = pipe.decode(torch.cat([prior.vary(code[None].expand(VARIATIONS, -1), 0.5, seed)
                                            for code in varied]), drawn_by=pipe.default_prior)
        rows = torch.cat([pipe.decode(varied)[:, None], variations.unflatten(0, (len(varied), VARIATIONS))], 1)
        save_png(enlarge(grid(rows.flatten(0, 1), nrow=1 + VARIATIONS), factor), folder / "variations.png")


def refined_picture_count(num_codes: int, num_priors: int, invertible: bool) -> tuple[int, int]:
    """How many images save_run_pictures refines, given its test codes and the priors: what its
    time is made of. → (towards images and their codes, towards drawn codes)."""
    pairs = min(PAIRS, num_codes // 2)
    varied = min(VARIED, num_codes) if invertible else 0
    return num_codes + varied, SAMPLES + SAMPLES_PER_PRIOR * num_priors + pairs * PATH_POINTS + varied * VARIATIONS
