"""Any folder of images, searched recursively, split by its own train/ and test/ (or val/)
subfolders when it has them, else by a seeded hash of each path.

``ImageFolderDataset[i]`` is a float32 tensor (3, N, N) in [-1, 1], or None with a
`CorruptImageWarning` naming the file when it cannot be decoded. ``path(i)`` is
the file's absolute Path.

* Files: every .png / .jpg / .jpeg / .webp (case-insensitive) under `root`,
  recursively; names starting with "." (hidden files and folders, e.g. macOS
  "._x.jpg" resource forks) are skipped; symlinked files are followed,
  symlinked folders are not. Items are sorted by relative POSIX path.
* Each file is used once, in one split, however many names reach it (symlinks, hard
  links: the same device and inode): the real file's name is kept when it is listed, else
  the first name in sorted order ("folders" mode: the train split's). A warning says how
  many names were dropped.
* Split, by `split_mode` (data.split):
  - "folders": ``root/train/`` is the train split and ``root/test/`` (else ``root/val/``,
    else ``root/validation/``) the test split, as torchvision-style datasets ship; files
    elsewhere under root are not used. A root without them is a FileNotFoundError.
  - "hash": ``u = int.from_bytes(sha256(f"{seed}:{relpath}").digest()[:8], "big") / 2**64``;
    the file is in "test" when ``u < test_fraction``, else in "train". Membership depends
    only on (seed, relative path), so adding or removing files never moves existing ones
    between splits.
  - "auto": "folders" when root has those subfolders, else "hash".
  The mode used is part of ``identity()``, so code caches of the two never mix.
* num_train / num_test keep the first n of the split in sorted order (0 = all).
* Preprocessing: square centre crop of the shorter side (or of cfg.crop when
  > 0, clamped to the shorter side), then antialiased LANCZOS resize to N×N.
  The 140/178 CelebA crop defaults do not apply here.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path

from scatgen.data.images import IMAGE_EXTENSIONS, FileImageDataset, is_image_file

__all__ = ["ImageFolderDataset", "list_images", "in_test_split", "split_folders", "unique_files"]

SPLIT_MODES = ("auto", "hash", "folders")
TEST_FOLDERS = ("test", "val", "validation")  # in order of preference: a dataset's test set is its held-out one
_announced: set[tuple[str, str]] = set()


def in_test_split(relpath: str, seed: int, test_fraction: float) -> bool:
    """sha256("seed:relpath") read as a number in [0, 1) < test_fraction (stable when files are added)."""
    digest = hashlib.sha256(f"{seed}:{relpath}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < test_fraction


def list_images(root: Path, recursive: bool = True) -> list[Path]:
    """Image files under `root` (see module doc), sorted by relative POSIX path."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")] if recursive else []
        for name in filenames:
            if name.startswith(".") or not is_image_file(name):
                continue
            p = Path(dirpath, name)
            if p.is_file():
                found.append((p.relative_to(root).as_posix(), p))
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


def unique_files(files: list[Path]) -> list[Path]:
    """`files` (in their order) with each file once, however many names reach it: a name that is
    not a symlink wins over links to the same file, else the earliest name does."""
    chosen: dict[object, Path] = {}
    for p in files:
        try:
            st = p.stat()  # follows links: the file itself
            key: object = (st.st_dev, st.st_ino)
        except OSError:
            key = p  # vanished since listing: reading it will report it
        if key not in chosen or (chosen[key].is_symlink() and not p.is_symlink()):
            chosen[key] = p
    kept = set(chosen.values())
    return [p for p in files if p in kept]


def _warn_duplicates(root: Path, dropped: int, total: int) -> None:
    if dropped:
        warnings.warn(f"folder dataset: {dropped} of the {total} image names under {root} are symlinks or hard "
                      f"links to files already listed; each file is used once, in one split", stacklevel=3)


def split_folders(root: Path) -> dict[str, Path] | None:
    """{"train": root/train, "test": root/test (or val, validation)} when root is split already, else None."""
    test = next((root / name for name in TEST_FOLDERS if (root / name).is_dir()), None)
    if not (root / "train").is_dir() or test is None:
        return None
    return {"train": root / "train", "test": test}


def _announce(root: Path, folders: dict[str, Path], mode: str) -> None:
    """Say once per process which split a pre-split folder gave; rank 0 only, as the trainer prints."""
    if (str(root), mode) in _announced or os.environ.get("RANK", "0") != "0":
        return
    _announced.add((str(root), mode))
    how = "data.split=auto found them; set data.split=hash to hash every file instead" if mode == "auto" \
        else "data.split=folders"
    print(f"folder dataset: {root} is split already: {folders['train'].name}/ is the train split, "
          f"{folders['test'].name}/ the test split ({how})", file=sys.stderr)


class ImageFolderDataset(FileImageDataset):
    """One split of an image folder (see module doc)."""

    name = "folder"

    def __init__(self, root: str | os.PathLike, split: str, image_size: int, crop: int = 0, seed: int = 0,
                 test_fraction: float = 0.1, limit: int = 0, split_mode: str = "hash") -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be one of ['train', 'test'], got {split!r}")
        if not 0.0 <= test_fraction <= 1.0:
            raise ValueError(f"folder: test_fraction must be in [0, 1], got {test_fraction}")
        if split_mode not in SPLIT_MODES:
            raise ValueError(f"folder: data.split must be one of {', '.join(SPLIT_MODES)}, got {split_mode!r}")
        if image_size <= 0:
            raise ValueError(f"folder: image_size must be positive, got {image_size}")
        if limit < 0:
            raise ValueError(f"folder: num_{split} must be >= 0 (0 = all), got {limit}")
        exts = ", ".join(IMAGE_EXTENSIONS)
        if not str(root):
            raise FileNotFoundError(f"image folder: data.root is empty; set it to a folder of {exts} files "
                                    f"(searched recursively)")
        root_path = Path(root).expanduser().resolve()
        if not root_path.is_dir():
            raise FileNotFoundError(f"image folder '{root_path}' does not exist; set data.root to a folder of "
                                    f"{exts} files (searched recursively)")
        folders = split_folders(root_path) if split_mode != "hash" else None
        if split_mode == "folders" and folders is None:
            raise FileNotFoundError(
                f"data.split=folders: '{root_path}' has no train/ subfolder beside test/ (or val/, validation/); "
                f"arrange the images as ROOT/train/ and ROOT/test/, or set data.split=hash to split by a hash "
                f"of each file's path")
        if folders is not None:
            _announce(root_path, folders, split_mode)
            # A test file reachable from train/ too would score the model on what it trained on.
            listed = {name: list_images(folder) for name, folder in folders.items()}
            everything = listed["train"] + listed["test"]
            kept = set(unique_files(everything))
            _warn_duplicates(root_path, len(everything) - len(kept), len(everything))
            files = [p for p in listed[split] if p in kept]
            if not files:
                raise FileNotFoundError(f"image folder '{folders[split]}' (the {split} split) holds no {exts} "
                                        f"files (searched recursively); add images or set data.split=hash")
            extra = dict(split_mode="folders", split_folder=folders[split].name)
        else:
            listed = list_images(root_path)
            files = unique_files(listed)
            _warn_duplicates(root_path, len(listed) - len(files), len(listed))
            if not files:
                raise FileNotFoundError(f"image folder '{root_path}' holds no {exts} files (searched "
                                        f"recursively; case-insensitive; names starting with '.' are skipped)")
            n_all = len(files)
            want_test = split == "test"
            files = [p for p in files
                     if in_test_split(p.relative_to(root_path).as_posix(), seed, test_fraction) == want_test]
            if not files:
                warnings.warn(f"folder dataset: the {split} split of {root_path} is empty "
                              f"({n_all} images, test_fraction={test_fraction}, seed={seed})", stacklevel=2)
            extra = dict(split_mode="hash", test_fraction=float(test_fraction))
        if limit:
            files = files[:limit]
        super().__init__(root_path, files, split, image_size, max(int(crop), 0), seed, extra=extra)
