"""Hub-style bundles: Pipeline.save_pretrained and scatgen.load of folders and cached repo ids."""

import json
import socket

import pytest
import torch

import scatgen
from scatgen.integrity import update_manifest
from scatgen.pipeline import Pipeline

# Every test here reads the session's trained run (conftest.run_dir), which a first test waits for.
pytestmark = pytest.mark.slow


def _same_outputs(a: Pipeline, b: Pipeline) -> None:
    codes = a.random_codes(4, seed=0)  # the bundle's flow prior
    assert torch.equal(codes, b.random_codes(4, seed=0))
    images = a.decode(codes, refine=0)
    assert torch.equal(images, b.decode(codes, refine=0))
    assert torch.equal(a.encode(images), b.encode(images))
    assert torch.equal(a.sample(2, seed=1, refine=2), b.sample(2, seed=1, refine=2))


def _refuse_network(monkeypatch) -> list:
    """Make every name lookup and connection fail at once, as offline, and record the attempts."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    try:  # huggingface_hub >= 2.4 looks up an "agent harnesses" list on the Hub for its User-Agent
        from huggingface_hub.utils import _detect_agent  # header, local_files_only or not: not ours
    except ImportError:
        pass
    else:
        monkeypatch.setattr(_detect_agent, "_fetch_registry", lambda: None)
    return attempts


def test_save_pretrained_then_load_gives_identical_outputs(run_dir, tmp_path):
    pipe = scatgen.load(run_dir)  # a train.py bundle, written before config.json existed
    pipe.save_pretrained(tmp_path / "hub")
    names = {p.relative_to(tmp_path / "hub").as_posix() for p in (tmp_path / "hub").rglob("*") if p.is_file()}
    assert names == {"config.json", "model.safetensors", "whitening.safetensors", "config.yaml", "bundle.json",
                     "priors/flow.safetensors", "README.md", "checksums.json"}
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["scatgen"]["d"] == 32 and config["config"]["encoder"]["J"] == 3
    assert "library_name: scatgen" in (tmp_path / "hub" / "README.md").read_text()
    again = scatgen.load(tmp_path / "hub")
    assert set(again.priors) == {"normal", "flow"}
    _same_outputs(pipe, again)
    _same_outputs(pipe, Pipeline.from_pretrained(tmp_path / "hub"))
    again.save_pretrained(tmp_path / "hub")  # over an earlier bundle: allowed
    # A bundle's config.json is for the Hub; scatgen reads config.yaml, and refuses a mismatch.
    config["config"]["encoder"]["L"] = 8
    (tmp_path / "hub" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="corrupt bundle.*config.json"):  # its checksum notices first
        scatgen.load(tmp_path / "hub")
    update_manifest(tmp_path / "hub", "config.json")  # a consistent but contradictory bundle
    with pytest.raises(ValueError, match="config.json and config.yaml disagree"):
        scatgen.load(tmp_path / "hub")


def test_save_pretrained_refuses_a_folder_with_other_files(run_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds other files \\(notes.txt\\)"):
        scatgen.load(run_dir).save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_a_repo_id_loads_from_the_local_cache_only(run_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    attempts = _refuse_network(monkeypatch)
    with pytest.raises(FileNotFoundError, match="'someone/tiny-scatgen'.*neither a folder nor a Hugging Face repo "
                                                "in the local cache.*never downloads"):
        scatgen.load("someone/tiny-scatgen")
    assert attempts == []  # the cache was all it looked at: no download attempt to wait for
    # The cache's layout, as snapshot_download leaves it: refs/main names a snapshot folder.
    pipe = scatgen.load(run_dir)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-scatgen"
    pipe.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    _same_outputs(pipe, scatgen.load("someone/tiny-scatgen"))
    # A path that is no folder and no repo id keeps the folder message.
    with pytest.raises(FileNotFoundError, match="no model bundle at"):
        scatgen.load(tmp_path / "nowhere" / "deeper" / "still")
