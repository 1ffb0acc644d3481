"""CelebA (aligned), read from a path the user gives; never downloaded.

Items are float32 tensors (3, N, N) in [-1, 1], or None (with a CorruptImageWarning
naming the file) for an unreadable file. Preprocessing: a square centre crop, then
an antialiased LANCZOS resize to N×N (see scatgen.data.images). The crop is
cfg.crop when > 0, else `default_crop(N)`: 140 for N < 128 (the usual 140 → 64²),
178 for N >= 128 (178 → 128², the full width of the 178×218 aligned images).
`path(i)` is the file's absolute Path; no attribute files are needed.

Accepted layouts, with data.root pointing at any of them:
- torchvision's: root/celeba/img_align_celeba/*.jpg and root/celeba/list_eval_partition.txt,
  or root = the celeba folder itself (root/img_align_celeba/ + root/list_eval_partition.txt).
  Kaggle's list_eval_partition.csv ("image_id,partition" header) is accepted too.
  If img_align_celeba/ exists but the partition file does not: FileNotFoundError naming it.
- root = the image folder (e.g. img_align_celeba) with the partition file inside it or
  beside it (one level up).
- a flat folder of the aligned JPEGs (000001.jpg ...) with no partition file: split by
  the official numbering of the file stem: 1–162770 train, 162771–182637 validation,
  182638–202599 test; numbers outside these ranges are ignored. Non-numeric names raise
  a ValueError suggesting data.name=folder.
With a partition file the official codes are used: 0 = train, 2 = test; the validation
images (1, and the 162771–182637 range) are not used by either split. A partition file
that lists images absent from the folder raises FileNotFoundError naming the count and
the first missing file. num_train / num_test keep the first n of the split in sorted
order (0 = all).
"""

from __future__ import annotations

import os
from pathlib import Path

from scatgen.data.images import FileImageDataset, is_image_file

PARTITION = "list_eval_partition.txt"
PARTITION_NAMES = (PARTITION, "list_eval_partition.csv")
SPLIT_CODE = {"train": 0, "test": 2}
OFFICIAL_RANGES = {"train": (1, 162770), "test": (182638, 202599)}


def default_crop(image_size: int) -> int:
    """CelebA's crop for data.crop = 0: 140 below 128² (140 → 64², as in GSN/DCGAN), 178 from 128² up."""
    return 140 if image_size < 128 else 178


def _partition_in(folder: Path) -> Path | None:
    return next((folder / n for n in PARTITION_NAMES if (folder / n).is_file()), None)


def _find_layout(root: Path) -> tuple[Path, Path | None]:
    """(image folder, partition file or None)."""
    if not root.exists():
        raise FileNotFoundError(
            f"no CelebA found: {root} does not exist; expected root/celeba/img_align_celeba/ with "
            f"root/celeba/{PARTITION} (torchvision's layout), or a flat folder of aligned CelebA JPEGs")
    for base in (root / "celeba", root):
        if (base / "img_align_celeba").is_dir():
            partition = _partition_in(base) or base / PARTITION
            if not partition.is_file():
                raise FileNotFoundError(
                    f"CelebA partition file missing: expected {partition} beside {base / 'img_align_celeba'} "
                    f"(torchvision's layout), or point data.root at a flat folder of the aligned JPEGs")
            return base / "img_align_celeba", partition
    for folder in (root, root.parent):
        partition = _partition_in(folder)
        if partition is not None and root.is_dir():
            return root, partition
    if root.is_dir() and any(is_image_file(p.name) for p in root.iterdir()):
        return root, None
    raise FileNotFoundError(
        f"no CelebA found at '{root}': expected root/celeba/img_align_celeba/ with "
        f"root/celeba/{PARTITION} (torchvision's layout), or a flat folder of aligned CelebA JPEGs")


def _read_partition(partition: Path, split: str) -> list[str]:
    """Names with the split's code, from "NAME CODE" lines (or "NAME,CODE" with an optional header)."""
    names = []
    try:
        text = partition.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{partition} is not UTF-8 text (byte {e.start}); restore the original "
                         f"list_eval_partition.txt") from None
    for line_no, line in enumerate(text.splitlines(), 1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        if line_no == 1 and len(parts) == 2 and not parts[1].isdigit():
            continue  # a CSV header such as "image_id,partition"
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"{partition}, line {line_no}: expected 'NAME.jpg CODE', got {line!r}")
        if int(parts[1]) == SPLIT_CODE[split]:
            names.append(parts[0])
    return names


class CelebADataset(FileImageDataset):
    """One split of aligned CelebA (see module doc)."""

    name = "celeba"

    def __init__(self, root: str | Path, split: str, image_size: int, crop: int = 0, limit: int = 0) -> None:
        if split not in SPLIT_CODE:
            raise ValueError(f"split must be one of ['train', 'test'], got {split!r}")
        if limit < 0:
            raise ValueError(f"celeba: num_{split} must be >= 0 (0 = all), got {limit}")
        if not str(root):
            raise FileNotFoundError(
                "no CelebA found: data.root is empty; expected root/celeba/img_align_celeba/ with "
                f"root/celeba/{PARTITION} (torchvision's layout), or a flat folder of aligned CelebA JPEGs")
        root = Path(root).expanduser().resolve()
        images_dir, partition = _find_layout(root)
        if partition is not None:
            names = sorted(_read_partition(partition, split))
            present = set(os.listdir(images_dir))
            missing = [n for n in names if n not in present]
            if missing:
                raise FileNotFoundError(f"{len(missing)} {split} image(s) listed in {partition} are missing from "
                                        f"{images_dir}, the first being {missing[0]}")
            files = [images_dir / n for n in names]
        else:
            lo, hi = OFFICIAL_RANGES[split]
            all_files = sorted(p for p in images_dir.iterdir()
                               if is_image_file(p.name) and not p.name.startswith("."))
            if not all(p.stem.isdigit() for p in all_files):
                bad = next(p for p in all_files if not p.stem.isdigit())
                raise ValueError(f"'{images_dir}' has no {PARTITION} and its file names are not CelebA's "
                                 f"numbers (e.g. {bad.name}); use data.name=folder for an arbitrary image folder")
            files = [p for p in all_files if lo <= int(p.stem) <= hi]
        if limit:
            files = files[:limit]
        crop = crop or default_crop(image_size)
        super().__init__(images_dir, files, split, image_size, crop,
                         extra={"partition": "file" if partition else "official numbering"})
