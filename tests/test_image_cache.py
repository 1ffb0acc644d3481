"""The uint8 image cache: hits, invalidation, atomic and verified writes, unreadable files, and
training batches bit-identical to those of the rendered or decoded images."""

import re
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch.utils.data import DataLoader

from conftest import tiny_overrides
from scatgen.codes import CodeSet, prepare_codes
from scatgen.config import DataConfig, load_config
from scatgen.data import (CachedImages, CorruptImageWarning, ImageFolderDataset, PolygonDataset, build_dataset,
                          cache_images, collate_skip_none)
from scatgen.data import cache as image_cache
from scatgen.data.batches import CodedImages, StepBatches


class CountingPolygons(PolygonDataset):
    """Polygons that count their renders (num_workers=0 only: workers count in their own copy)."""

    calls = 0

    def __getitem__(self, i):
        self.calls += 1
        return super().__getitem__(i)


class FailingPolygons(PolygonDataset):
    def __getitem__(self, i):
        if i == 7:
            raise RuntimeError("killed midway")
        return super().__getitem__(i)


def _entries(cache_dir):
    return sorted(p for p in cache_dir.glob("images-*") if p.is_dir())


def _as_a_new_process():
    image_cache._verified.clear()  # a new process verifies every checksum again


def _equal_items(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(a[i], b[i]) for i in range(len(a)))


def test_second_open_is_a_hit_with_bit_identical_items(tmp_path):
    ds = CountingPolygons("train", 32, 0, 12)
    cache_images(ds, tmp_path, progress=False)
    assert ds.calls == 12
    cache_images(ds, tmp_path, progress=False)
    _as_a_new_process()
    cached = cache_images(ds, tmp_path, progress=False)
    assert ds.calls == 12, "a hit must not render again"
    assert isinstance(cached, CachedImages) and len(_entries(tmp_path)) == 1
    assert cached.identity() == ds.identity() and cached.path(3) is None
    assert _equal_items(cached, ds) and cached[-1].dtype == torch.float32
    images, readable = cached.images(torch.tensor([5, 0, -1]))
    assert readable.all() and torch.equal(images, torch.stack([ds[5], ds[0], ds[11]]))
    with pytest.raises(IndexError, match="out of range"):
        cached[12]
    with pytest.raises(IndexError, match="out of range"):
        cached.images([0, 12])


def test_a_new_identity_or_size_is_a_new_entry(tmp_path):
    cache_images(PolygonDataset("train", 32, 0, 12), tmp_path, progress=False)
    for changed in (CountingPolygons("train", 32, 1, 12), CountingPolygons("train", 64, 0, 12),
                    CountingPolygons("train", 32, 0, 13), CountingPolygons("test", 32, 0, 12)):
        cached = cache_images(changed, tmp_path, progress=False)
        assert changed.calls == len(changed) and _equal_items(cached, changed)
    assert len(_entries(tmp_path)) == 5
    again = CountingPolygons("train", 32, 0, 12)
    cache_images(again, tmp_path, progress=False)
    assert again.calls == 0, "the other entries leave the first one valid"


def test_a_build_that_dies_midway_leaves_nothing_that_loads(tmp_path):
    with pytest.raises(RuntimeError, match="killed midway"):
        cache_images(FailingPolygons("train", 32, 0, 12), tmp_path / "cache", progress=False)
    assert _entries(tmp_path / "cache") == [] and not list((tmp_path / "cache").glob(".tmp-*"))
    # A killed process runs no cleanup: it leaves its temporary folder, here complete and
    # readable (killed just before the rename). It must never be read, and the next build removes it.
    complete = cache_images(PolygonDataset("train", 32, 0, 12), tmp_path / "elsewhere", progress=False).entry
    stale = tmp_path / "cache" / f".tmp-{complete.name}-killed"
    shutil.copytree(complete, stale)
    ds = CountingPolygons("train", 32, 0, 12)
    cached = cache_images(ds, tmp_path / "cache", progress=False)
    assert ds.calls == 12 and not stale.exists() and _equal_items(cached, ds)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "header"])
def test_a_damaged_entry_warns_naming_it_and_is_rebuilt(tmp_path, damage):
    ds = CountingPolygons("train", 32, 0, 12)
    entry = cache_images(ds, tmp_path, progress=False).entry
    data = entry / "images.u8"
    if damage == "flipped byte":
        raw = bytearray(data.read_bytes())
        raw[5000] ^= 0x01
        data.write_bytes(bytes(raw))
    elif damage == "truncated":
        data.write_bytes(data.read_bytes()[:-100])
    else:
        (entry / "header.json").write_text('{"format": 1')
    _as_a_new_process()
    with pytest.warns(UserWarning, match=re.escape(str(entry)) + ".*rebuilding"):
        cached = cache_images(ds, tmp_path, progress=False)
    assert ds.calls == 24 and _equal_items(cached, ds)


def _image_folder(root):
    rng = np.random.default_rng(0)
    root.mkdir()
    for k in range(5):
        Image.fromarray(rng.integers(0, 256, (40 + k, 36, 3), dtype=np.uint8)).save(root / f"{k}.png")
        Image.fromarray(rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)).save(root / f"{k}.jpg", quality=85)
    Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA").save(root / "alpha.png")
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


def _folder(tmp_path):
    return ImageFolderDataset(_image_folder(tmp_path / "images"), "train", 16, test_fraction=0.0)


def test_unreadable_files_stay_none_without_a_second_warning(tmp_path):
    ds = _folder(tmp_path)
    bad = next(i for i in range(len(ds)) if ds.path(i).name == "broken.jpg")
    with pytest.warns(CorruptImageWarning, match="broken.jpg"):
        cache_images(ds, tmp_path / "cache", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _as_a_new_process()
        cached = cache_images(ds, tmp_path / "cache", progress=False)
        assert cached[bad] is None
        images, readable = cached.images(range(len(ds)))
    assert readable.tolist() == [i != bad for i in range(len(ds))]
    with pytest.warns(CorruptImageWarning):
        decoded = [ds[i] for i in range(len(ds))]
    assert torch.equal(images, torch.stack([x for x in decoded if x is not None]))
    # A rewritten file changes the folder's identity, so it is never served from the old entry.
    Image.new("RGB", (30, 30), (200, 10, 10)).save(ds.path(0))
    ds = _folder_again(tmp_path)
    with pytest.warns(CorruptImageWarning):
        fresh = cache_images(ds, tmp_path / "cache", progress=False)
    assert len(_entries(tmp_path / "cache")) == 2 and torch.equal(fresh[0], ds[0])


def _folder_again(tmp_path):
    return ImageFolderDataset(tmp_path / "images", "train", 16, test_fraction=0.0)


def _training_batches(dataset, codeset, num_workers):
    # The loader of Trainer.train (scatgen/training.py), over 7 steps: more than one epoch.
    sampler = StepBatches(len(codeset.codes), batch_size=4, seed=3, start=0, stop=7, rank=0, world=1)
    loader = DataLoader(CodedImages(dataset, codeset), batch_sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_skip_none)
    return list(loader)


@pytest.mark.parametrize("source", ["polygons", "folder"])
def test_training_batches_from_cached_images_are_bit_identical(tmp_path, source):
    if source == "polygons":
        ds = PolygonDataset("train", 32, 0, 24)
    else:
        ds = _folder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        cached = cache_images(ds, tmp_path / "cache", num_workers=2 if source == "folder" else 0, progress=False)
        # Every item has a code, the unreadable one too, so both paths must skip it the same way.
        codeset = CodeSet(torch.randn(len(ds), 5), torch.arange(len(ds)))
        rendered = _training_batches(ds, codeset, num_workers=0)
        from_cache = _training_batches(cached, codeset, num_workers=0)
        from_cache_workers = _training_batches(cached, codeset, num_workers=2)
    assert len(rendered) == 7
    for batches in (from_cache, from_cache_workers):
        assert len(batches) == 7
        for mine, theirs in zip(batches, rendered):
            assert (mine is None) == (theirs is None)
            if mine is not None:
                assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
                assert mine[1].dtype == theirs[1].dtype == torch.float32
    if source == "folder":
        assert sum(len(b[1]) for b in rendered) < 7 * 4, "the unreadable file was drawn and skipped"


def test_images_that_are_not_uint8_levels_are_refused(tmp_path):
    class Shifted(PolygonDataset):
        def __getitem__(self, i):
            return super().__getitem__(i) * 0.5 + 0.001

    with pytest.raises(ValueError, match="Shifted item 0 .*data.cache_images=false"):
        cache_images(Shifted("train", 32, 0, 4), tmp_path, progress=False)
    assert _entries(tmp_path) == []


def test_build_dataset_follows_data_cache_images(tmp_path):
    on = DataConfig(name="polygons", image_size=32, num_train=8, num_test=4)
    off = DataConfig(name="polygons", image_size=32, num_train=8, num_test=4, cache_images=False)
    assert isinstance(build_dataset(on, "train", tmp_path, progress=False), CachedImages)
    assert isinstance(build_dataset(off, "train", tmp_path), PolygonDataset)
    assert isinstance(build_dataset(on, "train"), PolygonDataset), "no cache_dir, no cache"
    assert len(_entries(tmp_path)) == 1


@pytest.mark.slow
def test_encoding_through_the_cache_gives_the_same_codes(tmp_path):
    extra = dict(data__num_train=64, data__num_test=16)
    _, cached = prepare_codes(load_config(None, tiny_overrides(tmp_path / "a", **extra)), progress=False)
    assert {p.name.split("-")[1] for p in _entries(tmp_path / "a" / "cache")} == {"train", "test"}
    off = load_config(None, tiny_overrides(tmp_path / "b", data__cache_images="false", **extra))
    _, decoded = prepare_codes(off, progress=False)
    assert _entries(tmp_path / "b" / "cache") == []
    for split in ("train", "test"):
        assert torch.equal(cached[split].codes, decoded[split].codes)


def _open_on_two_ranks(rank, init, cache_dir, results):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        ds = CountingPolygons("train", 32, 0, 6)
        cached = cache_images(ds, cache_dir, progress=False)
        results[rank] = (ds.calls, _equal_items(cached, ds))
    finally:
        torch.distributed.destroy_process_group()


def test_rank_zero_builds_and_the_other_rank_waits_then_opens(tmp_path):
    results = mp.Manager().dict()
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_open_on_two_ranks, args=(init, tmp_path / "cache", results), nprocs=2, start_method="fork")
    assert dict(results) == {0: (6, True), 1: (0, True)}
