import pytest
import torch

from conftest import tiny_overrides
from scatgen.codes import prepare_codes
from scatgen.config import load_config
from scatgen.scattering import Scattering

# Every test here scatters and whitens a tiny data set, over ~3 s alone.
pytestmark = pytest.mark.slow


def _cfg(tmp_path, **extra):
    return load_config(None, tiny_overrides(tmp_path, **extra))


def _count_scatter_calls(monkeypatch):
    """Counts the images that go through the scattering transform."""
    calls = {"n": 0}
    original = Scattering.forward

    def counting(self, images):
        calls["n"] += len(images)
        return original(self, images)

    monkeypatch.setattr(Scattering, "forward", counting)
    return calls


def test_cache_hit_then_invalidation_on_J_and_d(tmp_path, monkeypatch):
    calls = _count_scatter_calls(monkeypatch)
    e1, first = prepare_codes(_cfg(tmp_path), progress=False)
    assert first["train"].codes.shape == (256, 32) and first["test"].codes.shape == (64, 32)
    assert calls["n"] > 0
    calls["n"] = 0
    e2, second = prepare_codes(_cfg(tmp_path), progress=False)
    assert calls["n"] == 0, "a cache hit must not scatter anything"
    assert torch.equal(first["train"].codes, second["train"].codes)
    assert e1.whitening.fingerprint() == e2.whitening.fingerprint()
    # Changing d or J changes the key: recomputed, and the old entries stay valid.
    _, by_d = prepare_codes(_cfg(tmp_path, whitening__d=16), progress=False)
    assert calls["n"] > 0 and by_d["train"].codes.shape == (256, 16)
    calls["n"] = 0
    _, by_j = prepare_codes(_cfg(tmp_path, encoder__J=2), progress=False)
    assert calls["n"] > 0 and by_j["train"].codes.shape == (256, 32)
    assert not torch.allclose(by_j["train"].codes, first["train"].codes)
    codes_files = list((tmp_path / "cache").glob("codes-train-*.safetensors"))
    assert len(codes_files) == 3


def test_truncated_cache_entry_is_recomputed(tmp_path):
    _, first = prepare_codes(_cfg(tmp_path), progress=False)
    entry = next((tmp_path / "cache").glob("codes-train-*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:100])  # what a killed non-atomic writer would leave
    with pytest.warns(UserWarning, match="corrupt code cache entry .*recomputing"):
        _, again = prepare_codes(_cfg(tmp_path), progress=False)
    assert torch.equal(first["train"].codes, again["train"].codes)


def test_spilled_passes_give_the_same_codes_as_rescattering(tmp_path, monkeypatch):
    calls = _count_scatter_calls(monkeypatch)
    _, spilled = prepare_codes(_cfg(tmp_path / "a"), progress=False)
    spilled_calls, calls["n"] = calls["n"], 0
    _, rescattered = prepare_codes(_cfg(tmp_path / "b", whitening__spill_gb=0), progress=False)
    # Spilled: one batch peeked for the fit's shift, the train split once, the test split once.
    assert spilled_calls == 64 + 256 + 64
    # Rescattered: the peek, 3 passes of the randomized fit, the train encoding and the test split.
    assert calls["n"] == 64 + 3 * 256 + 256 + 64
    torch.testing.assert_close(spilled["train"].codes, rescattered["train"].codes, rtol=1e-4, atol=1e-4)
    assert not list((tmp_path / "a" / "cache").glob(".spill-*")), "the spill file must be removed"


def test_train_codes_are_white(tmp_path):
    _, codesets = prepare_codes(_cfg(tmp_path), progress=False)
    z = codesets["train"].codes.double()
    cov = torch.cov(z.T)
    assert (cov - torch.eye(32, dtype=torch.float64)).norm() / 32**0.5 < 1e-3
