import hashlib
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scatgen.config import DataConfig
from scatgen.data import CorruptImageWarning, build_dataset, collate_skip_none, load_image
from scatgen.data.polygons import TEST_OFFSET

ROOT = Path(__file__).resolve().parent.parent


def _digest(images) -> str:
    return hashlib.sha256(b"".join(x.numpy().tobytes() for x in images)).hexdigest()


@pytest.mark.slow
def test_polygons_are_deterministic_across_calls_and_processes():
    cfg = DataConfig(name="polygons", image_size=32, num_train=20, num_test=5)
    here = _digest([build_dataset(cfg, "train")[i] for i in range(5)])
    assert here == _digest([build_dataset(cfg, "train")[i] for i in range(5)])
    code = ("import hashlib; from scatgen.config import DataConfig; from scatgen.data import build_dataset; "
            "d = build_dataset(DataConfig(name='polygons', image_size=32, num_train=20, num_test=5), 'train'); "
            "print(hashlib.sha256(b''.join(d[i].numpy().tobytes() for i in range(5))).hexdigest())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                           env=env, timeout=120).stdout.strip()
    assert other == here


@pytest.mark.parametrize("size", [32, 64, 128])
def test_polygons_shapes_range_and_disjoint_splits(size):
    cfg = DataConfig(name="polygons", image_size=size, num_train=3, num_test=3)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    x = train[0]
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.05  # a visible shape on a background
    assert not torch.equal(train[0], test[0])
    assert test.global_index(0) == TEST_OFFSET and train.global_index(2) == 2
    assert len(train) == 3 and train.identity() != test.identity()
    json.dumps(train.identity())
    assert train.path(0) is None
    with pytest.raises(IndexError):
        train[3]


def test_polygons_range_and_variety_over_many_images():
    cfg = DataConfig(name="polygons", image_size=32, num_train=200, num_test=1)
    xs = torch.stack([build_dataset(cfg, "train")[i] for i in range(200)])
    assert xs.min() >= -1 and xs.max() <= 1 and xs.dtype == torch.float32
    assert len({_digest([x]) for x in xs}) == 200
    assert (xs.flatten(1).std(dim=1) > 0.02).all()  # every shape contrasts with its background


def test_polygons_reject_other_sizes():
    with pytest.raises(ValueError, match="32, 64, 128"):
        build_dataset(DataConfig(name="polygons", image_size=48), "train")
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset(DataConfig(), "valid")


def _write_images(root):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), "L").save(root / "gray.png")
    rgba = rng.integers(0, 255, (40, 40, 4), dtype=np.uint8)
    (root / "sub").mkdir()
    Image.fromarray(rgba, "RGBA").save(root / "sub" / "rgba.png")
    (root / "corrupt.jpg").write_bytes(rng.integers(0, 255, 500, dtype=np.uint8).tobytes())
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "full.jpg", quality=90)
    data = (root / "full.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])


def test_folder_dataset_handles_bad_gray_and_rgba_files(tmp_path):
    root = tmp_path / "imgs"
    _write_images(root)
    cfg = DataConfig(name="folder", root=str(root), image_size=16, test_fraction=0.01, num_train=0)
    train = build_dataset(cfg, "train")
    names = {train.path(i).name: i for i in range(len(train))}
    assert {"rgb.png", "gray.png", "rgba.png", "corrupt.jpg", "truncated.jpg", "full.jpg"} <= set(names)
    for good in ("rgb.png", "gray.png", "rgba.png", "full.jpg"):
        x = train[names[good]]
        assert x.shape == (3, 16, 16)
    gray = train[names["gray.png"]]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    rgba = train[names["rgba.png"]]
    assert rgba.min() >= -1 and rgba.max() <= 1
    for bad in ("corrupt.jpg", "truncated.jpg"):
        with pytest.warns(CorruptImageWarning, match=re.escape(str(train.path(names[bad])))):
            assert train[names[bad]] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        batch = collate_skip_none([train[i] for i in range(len(train))])
    assert batch.shape == (4, 3, 16, 16)
    assert collate_skip_none([None, None]) is None
    x = torch.zeros(3, 4, 4)
    images, indices = collate_skip_none([(x, 0), None, (None, 1), (x + 1, 2)])
    assert images.shape == (2, 3, 4, 4) and indices.tolist() == [0, 2]


def test_alpha_is_composited_on_white_and_palette_becomes_rgb(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)  # opaque red left half, transparent black right half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", 8)
    assert torch.equal(x[:, :, 4:], torch.ones(3, 8, 4))
    assert torch.equal(x[:, :, :4], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 8, 4))
    Image.new("RGB", (8, 8), (0, 0, 255)).convert("P").save(tmp_path / "p.png")
    assert torch.allclose(load_image(tmp_path / "p.png", 8)[2], torch.ones(8, 8))


def test_folder_identity_tracks_file_changes(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, i, i)).save(root / f"{i}.png")
    cfg = DataConfig(name="folder", root=str(root), image_size=8, test_fraction=0.0, num_train=0)
    first = build_dataset(cfg, "train").identity()
    json.dumps(first)
    assert first["root"] == str(root.resolve()) and first["count"] == 3
    assert build_dataset(cfg, "train").identity() == first
    Image.new("RGB", (9, 9), (50, 0, 0)).save(root / "1.png")
    os.utime(root / "1.png", ns=(1, 1))
    assert build_dataset(cfg, "train").identity()["files"] != first["files"]


def test_folder_split_is_stable_when_files_are_added(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(40):
        Image.new("RGB", (8, 8), (i, i, i)).save(root / f"{i:03d}.png")
    cfg = DataConfig(name="folder", root=str(root), image_size=8, test_fraction=0.3, num_train=0, num_test=0)
    before = {p.name for p in build_dataset(cfg, "test").files}
    assert 0 < len(before) < 40
    for i in range(40, 80):
        Image.new("RGB", (8, 8), (i, i, i)).save(root / f"{i:03d}.png")
    after_test = {p.name for p in build_dataset(cfg, "test").files}
    after_train = {p.name for p in build_dataset(cfg, "train").files}
    assert before <= after_test and not (before & after_train)
    assert len(after_test | after_train) == 80


def test_folder_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(DataConfig(name="folder", root=str(tmp_path / "nope")), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        build_dataset(DataConfig(name="folder", root=str(tmp_path / "empty")), "train")


def _presplit_tree(root, test_name="test"):
    """root/train/ (6 images, two class folders), root/<test_name>/ (3) and 2 stray top-level files."""
    for sub, n in (("train/cat", 3), ("train/dog", 3), (f"{test_name}/cat", 3)):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 10 * len(sub), 0)).save(root / sub / f"{i}.png")
    for name in ("stray0.png", "stray1.png"):
        Image.new("RGB", (8, 8)).save(root / name)


@pytest.mark.parametrize("test_name", ["test", "val"])
def test_presplit_folder_uses_its_own_split(tmp_path, capfd, test_name):
    root = tmp_path / "imgs"
    _presplit_tree(root, test_name)
    cfg = DataConfig(name="folder", root=str(root), image_size=8, num_train=0, num_test=0)  # data.split=auto
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    rel = lambda ds: {p.relative_to(root.resolve()).as_posix() for p in ds.files}  # noqa: E731
    assert rel(train) == {f"train/{c}/{i}.png" for c in ("cat", "dog") for i in range(3)}
    assert rel(test) == {f"{test_name}/cat/{i}.png" for i in range(3)}
    assert f"{test_name}/ the test split" in capfd.readouterr().err
    # hash mixes every file, the held-out ones and the strays included, into its own split.
    hashed = DataConfig(name="folder", root=str(root), image_size=8, num_train=0, num_test=0, split="hash",
                        test_fraction=0.5)
    everything = rel(build_dataset(hashed, "train")) | rel(build_dataset(hashed, "test"))
    assert len(everything) == 11 and rel(build_dataset(hashed, "test")) != rel(test)
    # The split mode is part of the identity, so the code cache never mixes the two.
    assert build_dataset(hashed, "train").identity()["split_mode"] == "hash"
    assert train.identity()["split_mode"] == "folders"
    folders = DataConfig(name="folder", root=str(root), image_size=8, split="folders")
    assert build_dataset(folders, "train").identity() == train.identity()


def test_presplit_folder_errors_and_old_configs(tmp_path):
    from scatgen.config import config_from_dict, config_to_dict, load_config

    root = tmp_path / "flat"
    _write_images(root)
    cfg = DataConfig(name="folder", root=str(root), image_size=8, split="folders")
    with pytest.raises(FileNotFoundError, match="no train/ subfolder.*set data.split=hash"):
        build_dataset(cfg, "train")
    # auto on a folder without the subfolders hashes, as before.
    assert build_dataset(DataConfig(name="folder", root=str(root), image_size=8), "train").identity()["split_mode"] \
        == "hash"
    with pytest.raises(ValueError, match="data.split=folders applies to data.name=folder"):
        load_config(None, {"data.split": "folders"})
    with pytest.raises(ValueError, match="data.split.*auto, hash, folders"):
        load_config(None, {"data.split": "folder"})
    # A config saved before data.split existed was trained on hashed folders: it still reads as hash.
    tree = config_to_dict(load_config(None, {"data.name": "folder", "data.root": str(root)}))
    assert tree["data"].pop("split") == "auto"
    assert config_from_dict(tree).data.split == "hash"


def _fake_celeba(root, with_partition=True):
    images = root / "celeba" / "img_align_celeba" if with_partition else root
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, code in zip(range(1, 7), [0, 0, 0, 1, 2, 2]):
        Image.new("RGB", (178, 218), (40 * i, 10, 10)).save(images / f"{i:06d}.jpg")
        lines.append(f"{i:06d}.jpg {code}")
    if with_partition:
        (root / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")


def test_celeba_torchvision_layout(tmp_path):
    _fake_celeba(tmp_path)
    cfg = DataConfig(name="celeba", root=str(tmp_path), image_size=64, num_train=0, num_test=0)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert [p.name for p in train.files] == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert [p.name for p in test.files] == ["000005.jpg", "000006.jpg"]
    assert train[0].shape == (3, 64, 64) and train.crop == 140
    assert build_dataset(DataConfig(name="celeba", root=str(tmp_path), image_size=128), "train").crop == 178


def test_celeba_flat_folder_uses_official_numbering(tmp_path):
    _fake_celeba(tmp_path, with_partition=False)
    Image.new("RGB", (178, 218)).save(tmp_path / "182640.jpg")
    cfg = DataConfig(name="celeba", root=str(tmp_path), image_size=64, num_train=0, num_test=0)
    assert len(build_dataset(cfg, "train")) == 6
    assert [p.name for p in build_dataset(cfg, "test").files] == ["182640.jpg"]


def test_celeba_other_roots_and_cap(tmp_path):
    _fake_celeba(tmp_path)
    for root in (tmp_path / "celeba", tmp_path / "celeba" / "img_align_celeba"):
        d = build_dataset(DataConfig(name="celeba", root=str(root), image_size=32, num_train=2), "train")
        assert [p.name for p in d.files] == ["000001.jpg", "000002.jpg"] and d.crop == 140
        assert d.identity()["count"] == 2 and d.identity()["split"] == "train"


def test_celeba_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="img_align_celeba") as info:
        build_dataset(DataConfig(name="celeba", root=str(tmp_path / "missing")), "train")
    assert str(tmp_path / "missing") in str(info.value) and "flat folder" in str(info.value)
    (tmp_path / "celeba" / "img_align_celeba").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "celeba" / "list_eval_partition.txt"))):
        build_dataset(DataConfig(name="celeba", root=str(tmp_path)), "train")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n")
    with pytest.raises(FileNotFoundError, match="2 train image.*000001.jpg"):
        build_dataset(DataConfig(name="celeba", root=str(tmp_path)), "train")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "cat.jpg")
    with pytest.raises(ValueError, match="data.name=folder"):
        build_dataset(DataConfig(name="celeba", root=str(flat)), "train")


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "nope.png", 32)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(tmp_path / "bad.png", 32)
    Image.new("RGB", (50, 40), (255, 0, 0)).save(tmp_path / "red.png")
    x = load_image(tmp_path / "red.png", 32)
    assert x.shape == (3, 32, 32) and torch.allclose(x[0], torch.ones(32, 32))
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path, 32)
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "exact.png")
    exact = load_image(tmp_path / "exact.png", 16, crop=8)  # already the size: used as is
    assert torch.equal(exact, torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1)
