"""OpenMP's wait policy: set by the entry points before torch loads, never by the library.

A sitecustomize module on the child's path records OMP_WAIT_POLICY at the moment the child
first imports torch, i.e. what torch's OpenMP runtime reads when it loads."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from scatgen.threads import ENTRY_POINT_SETTINGS, configure_threads, entry_point_environment

PROBE = '''
import os, sys

class _TorchImportProbe:
    """Writes OMP_WAIT_POLICY to $PROBE_FILE when torch is first imported, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            with open(os.environ["PROBE_FILE"], "w") as f:
                f.write(os.environ.get("OMP_WAIT_POLICY", "<unset>"))
            sys.meta_path.remove(self)
        return None

sys.meta_path.insert(0, _TorchImportProbe())
'''


def console_script() -> str | None:
    return shutil.which("scatgen", path=str(Path(sys.executable).parent))


def policy_when_torch_loads(cmd: list[str], tmp_path: Path, **env: str) -> str:
    """Run cmd (a help command: quick, but it loads torch); OMP_WAIT_POLICY as torch loaded."""
    (tmp_path / "sitecustomize.py").write_text(PROBE)
    probe = tmp_path / "policy.txt"
    child = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    child.update(env, PROBE_FILE=str(probe),
                 PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(cmd, cwd=ROOT, env=child, capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert probe.exists(), f"{' '.join(cmd)} never imported torch"
    return probe.read_text()


ENTRY_POINTS = {
    "train.py": [sys.executable, "train.py", "--help"],
    "sample.py": [sys.executable, "sample.py", "--help"],
    "python -m scatgen": [sys.executable, "-m", "scatgen", "sample", "--help"],
}
if console_script():  # the venv's console script, with this checkout first on the path
    ENTRY_POINTS["scatgen"] = [console_script(), "sample", "--help"]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_points_wait_passively_from_before_torch_loads(tmp_path, name):
    assert policy_when_torch_loads(ENTRY_POINTS[name], tmp_path) == "PASSIVE"


def test_a_policy_the_user_set_wins(tmp_path):
    assert policy_when_torch_loads(ENTRY_POINTS["sample.py"], tmp_path, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


def test_the_library_leaves_the_environment_alone(tmp_path):
    code = ("import os, sys; before = dict(os.environ); import scatgen.cli; assert 'torch' not in sys.modules; "
            "import scatgen; pipe_class = scatgen.Pipeline; "
            "assert 'torch' in sys.modules; assert dict(os.environ) == before")
    assert policy_when_torch_loads([sys.executable, "-c", code], tmp_path) == "<unset>"


def test_configure_threads_only_before_torch_and_only_where_unset(monkeypatch):
    # sys.modules and os.environ are restored after the test
    monkeypatch.setitem(sys.modules, "torch", sys.modules.get("torch", object()))  # loaded: too late
    monkeypatch.setattr(os, "environ", {})
    assert configure_threads() is False and os.environ == {}
    monkeypatch.delitem(sys.modules, "torch")  # not loaded yet, as an entry point sees it
    assert configure_threads() is True and os.environ == ENTRY_POINT_SETTINGS
    monkeypatch.setattr(os, "environ", {"OMP_WAIT_POLICY": "active"})
    assert configure_threads() is True and os.environ == {"OMP_WAIT_POLICY": "active"}


def test_entry_point_environment_is_a_copy_that_keeps_user_values():
    env = {"PATH": "/bin"}
    assert entry_point_environment(env) == {"PATH": "/bin", **ENTRY_POINT_SETTINGS} and env == {"PATH": "/bin"}
    assert entry_point_environment({"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"
