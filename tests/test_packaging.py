"""The package as users install it: a wheel, installed non-editably into a fresh environment, finds its presets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list, cwd: Path) -> subprocess.CompletedProcess:
    # Without PYTHONPATH, so that nothing can be imported from a source tree.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_an_installed_wheel_finds_its_presets(tmp_path):
    # Build from a copy, so that the build leaves nothing (build/, *.egg-info) in the checkout.
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, project / name)
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
          "--wheel-dir", tmp_path / "wheels", project], tmp_path)
    (wheel,) = (tmp_path / "wheels").glob("medsyngan-*.whl")
    assert "medsyngan/presets/dcgan64.toml" in zipfile.ZipFile(wheel).namelist()

    # A fresh environment that sees the installed dependencies but not this checkout (a path in a .pth file is
    # added as is: the editable install's own .pth in that folder is not processed).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path)
                .stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel],
         tmp_path)

    where = _run([python, "-c", "import medsyngan.config as c; print(c.__file__)"], tmp_path).stdout.strip()
    assert Path(where).is_relative_to(site)
    shown = _run([venv / "bin" / "medsyngan", "config", "show", "--config", "dcgan64"], tmp_path).stdout
    assert 'name = "dcgan64"' in shown and "ngf = 64" in shown
