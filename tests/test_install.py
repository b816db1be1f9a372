"""The install is namespaced: `pip install .` puts `prestage` (with prestage.stages and prestage.runner) into
site-packages and nothing generic such as `stages` or `runner`, and the console script works there."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_pip_install_adds_only_the_prestage_namespace(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("prestage-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"prestage", wheel.name.split("-py")[0] + ".dist-info"}, tops
    names = zipfile.ZipFile(wheel).namelist()
    assert "prestage/stages/records.py" in names and "prestage/runner/cli.py" in names
    assert "prestage/stages/launch/models/small_batch.c" in names  # the CPU kernels' source, compiled at first use

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    inst = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert inst.returncode == 0, inst.stderr
    site = Path(
        subprocess.check_output(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    installed = {p.name for p in site.iterdir()}
    assert "prestage" in installed and not {"stages", "runner"} & installed, installed
    # the dependencies (click, msgpack, ...) from this test's environment, appended after the fresh site-packages
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(venv / "bin" / "prestage"), "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
    )
    assert out.returncode == 0 and "resolve -> configure" in out.stdout, out.stderr
    where = subprocess.check_output(
        [str(py), "-c", "import prestage.stages, prestage.runner; print(prestage.stages.__file__)"],
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert where.startswith(str(site)), where
