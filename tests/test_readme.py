"""The README's Python blocks, run as they stand against a small trained run."""

import re

import pytest

from conftest import ROOT

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_has_the_walkthrough():
    assert any("save_pretrained" in block and "pipe.encode" in block for block in BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, run_dir, tmp_path, monkeypatch):
    # The blocks name runs/polygons; here that is the tiny run, and whatever they write lands in tmp_path.
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "polygons").symlink_to(run_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "readme"})
    assert not list(run_dir.glob("**/.tmp-*")), "a README block wrote into the run it reads"
