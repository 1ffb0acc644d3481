"""The `scatgen` command (python -m scatgen, and the console script when it is installed)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scatgen
from conftest import ROOT, as_args, tiny_overrides
from scatgen.cli import find_config, main, packaged_configs


def scatgen_command(*args: str, cwd: Path, script: str | None = None, timeout: int = 300):
    """Run `python -m scatgen ARGS` (or the console script) with this checkout's scatgen first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [script] if script else [sys.executable, "-m", "scatgen"]
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def launchers() -> list[str | None]:
    # The venv's console script runs whichever scatgen it was installed from; PYTHONPATH points it here.
    script = shutil.which("scatgen", path=str(Path(sys.executable).parent))
    return [None] + ([script] if script else [])


@pytest.mark.slow
@pytest.mark.parametrize("script", launchers())
def test_help_and_version_in_a_subprocess(tmp_path, script):
    result = scatgen_command("--help", cwd=tmp_path, script=script)
    assert result.returncode == 0, result.stderr
    assert "scatgen train polygons" in result.stdout and "scatgen evaluate" in result.stdout
    assert "packaged configs: celeba128, celeba64, polygons-64" in result.stdout
    result = scatgen_command("--version", cwd=tmp_path, script=script)
    assert result.stdout.strip() == f"scatgen {scatgen.__version__}"


def test_bad_command_and_config_names(capsys):
    assert main(["smaple", "runs/x"]) == 2
    assert "unknown command 'smaple'; expected one of train, sample" in capsys.readouterr().err
    assert main(["train", "polygon"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "config 'polygon' is neither a file nor a packaged config; packaged configs: celeba128" in err
    assert main([]) == 2 and "scatgen train" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "usage: scatgen sample" in capsys.readouterr().out


def test_packaged_configs_are_the_project_configs(tmp_path, monkeypatch):
    assert {name: path.read_text() for name, path in packaged_configs().items()} == \
        {p.stem: p.read_text() for p in (ROOT / "configs").glob("*.yaml")}
    monkeypatch.chdir(tmp_path)  # from any folder: by name, or by the README's configs/NAME.yaml
    assert find_config("polygons") == find_config("configs/polygons.yaml") == packaged_configs()["polygons"]
    (tmp_path / "polygons.yaml").write_text("train:\n  lr: 0.5\n")
    assert find_config("polygons.yaml") == Path("polygons.yaml")  # a file of that name wins


@pytest.mark.slow
def test_scatgen_train_then_sample_from_another_folder(tmp_path):
    overrides = tiny_overrides(tmp_path, train__max_steps=4, prior__kind="normal", refine__steps=0)
    result = scatgen_command("train", "polygons", *as_args(overrides), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "model" / "bundle.json").is_file() and (run / "images" / "samples.png").is_file()
    assert f"next:     scatgen evaluate {run}" in result.stdout
    result = scatgen_command("sample", str(run), "--n", "2", "--out", str(tmp_path / "s"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "s").glob("samples-normal-refine0-seed0-*.png"))


def test_user_images_get_the_datasets_crop(tmp_path):
    """A CelebA-64 model crops a user's file at 140 px, as its dataset does, not at the shorter side."""
    from PIL import Image

    from scatgen.cli import user_image
    from scatgen.config import DataConfig
    from scatgen.data import load_image

    rng = torch.Generator().manual_seed(0)
    pixels = (torch.rand(218, 178, 3, generator=rng) * 255).to(torch.uint8).numpy()
    path = tmp_path / "face.png"
    Image.fromarray(pixels).save(path)
    image = user_image(path, DataConfig(name="celeba", image_size=64))
    assert torch.equal(image, load_image(path, 64, crop=140))
    assert not torch.equal(image, load_image(path, 64, crop=0))
    # folders have no default crop: the shorter side
    assert torch.equal(user_image(path, DataConfig(name="folder", image_size=64)), load_image(path, 64, crop=0))
