"""CelebA (aligned), read from a path the user gives; never downloaded.

Items are float32 tensors (3, N, N) in [-1, 1]: a centre crop (140 for 64², 178 for
128² by default) then an antialiased resize (see scatgen.data.images), or None for an
unreadable file.

Accepted layouts, with `root` pointing at any of them:
- torchvision's: root/celeba/img_align_celeba/*.jpg and root/celeba/list_eval_partition.txt
  (also `root` = the celeba folder itself). The official partition is used: 0 = train,
  2 = test; the validation images (1) are not used.
- a flat folder of the aligned JPEGs (000001.jpg ...) without a partition file: split by
  the official numbering, 1–162770 train, 162771–182637 validation (unused),
  182638–202599 test.
"""

from __future__ import annotations

from pathlib import Path

from scatgen.data.images import FileImageDataset, is_image_file

PARTITION = "list_eval_partition.txt"
SPLIT_CODE = {"train": 0, "test": 2}
OFFICIAL_RANGES = {"train": (1, 162770), "test": (182638, 202599)}


def default_crop(image_size: int) -> int:
    """140 → 64² and 178 → 128², the usual GSN/DCGAN preprocessing; in between, scaled."""
    return 140 if image_size <= 64 else 178


def _find_layout(root: Path) -> tuple[Path, Path | None]:
    """(image folder, partition file or None)."""
    for base in (root / "celeba", root):
        if (base / "img_align_celeba").is_dir():
            partition = base / PARTITION
            if not partition.is_file():
                raise FileNotFoundError(
                    f"CelebA partition file missing: expected {partition} beside {base / 'img_align_celeba'} "
                    f"(torchvision's layout), or point data.root at a flat folder of the aligned JPEGs")
            return base / "img_align_celeba", partition
    for partition in (root / PARTITION, root.parent / PARTITION):
        if partition.is_file() and root.is_dir():
            return root, partition
    if root.is_dir() and any(is_image_file(p.name) for p in root.iterdir()):
        return root, None
    raise FileNotFoundError(
        f"no CelebA found at '{root}': expected root/celeba/img_align_celeba/ with "
        f"root/celeba/{PARTITION} (torchvision's layout), or a flat folder of aligned CelebA JPEGs")


def _read_partition(partition: Path, split: str) -> list[str]:
    names = []
    for line_no, line in enumerate(partition.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"{partition}, line {line_no}: expected 'NAME.jpg CODE', got {line!r}")
        if int(parts[1]) == SPLIT_CODE[split]:
            names.append(parts[0])
    return names


class CelebADataset(FileImageDataset):
    name = "celeba"

    def __init__(self, root: str | Path, split: str, image_size: int, crop: int = 0, limit: int = 0) -> None:
        root = Path(root).expanduser().resolve()
        images_dir, partition = _find_layout(root)
        if partition is not None:
            names = sorted(_read_partition(partition, split))
            files = [images_dir / n for n in names]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{len(missing)} image(s) listed in {partition} are missing from "
                                        f"{images_dir}, the first being {missing[0].name}")
        else:
            lo, hi = OFFICIAL_RANGES[split]
            all_files = sorted(p for p in images_dir.iterdir() if is_image_file(p.name))
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
