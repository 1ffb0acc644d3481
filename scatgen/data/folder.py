"""Any folder of images, searched recursively: png, jpg, jpeg, webp.

Items are float32 tensors (3, N, N) in [-1, 1] (see scatgen.data.images), or None
for an unreadable file. The split is a seeded hash of each file's relative path, so
a file keeps its split when others are added or removed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from scatgen.data.images import IMAGE_EXTENSIONS, FileImageDataset, is_image_file


def in_test_split(relpath: str, seed: int, test_fraction: float) -> bool:
    """sha256("seed:relpath") read as a number in [0, 1) < test_fraction."""
    digest = hashlib.sha256(f"{seed}:{relpath}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def list_images(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*") if p.is_file() and is_image_file(p.name)),
                  key=lambda p: p.relative_to(root).as_posix())


class ImageFolderDataset(FileImageDataset):
    name = "folder"

    def __init__(self, root: str | Path, split: str, image_size: int, crop: int = 0, seed: int = 0,
                 test_fraction: float = 0.1, limit: int = 0) -> None:
        root = Path(root).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder '{root}' does not exist; set data.root to a folder of "
                                    f"{', '.join(IMAGE_EXTENSIONS)} files (searched recursively)")
        files = list_images(root)
        if not files:
            raise FileNotFoundError(f"image folder '{root}' holds no {', '.join(IMAGE_EXTENSIONS)} files "
                                    f"(searched recursively)")
        want_test = split == "test"
        files = [f for f in files if in_test_split(f.relative_to(root).as_posix(), seed, test_fraction) == want_test]
        if limit:
            files = files[:limit]
        super().__init__(root, files, split, image_size, crop, seed, extra={"test_fraction": test_fraction})
