"""The README's make pattern: manifests as targets; a second make runs nothing, and touching an input re-runs
only the stages that depend on it (a cached stage leaves its manifest untouched, so nothing cascades)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

MAKEFILE = """\
P   := {python} -m prestage --artifacts arts
RUN := arts/tiny

all: $(RUN)/tokenize-prep.msgpack $(RUN)/fetch-weights.msgpack

$(RUN)/resolve.msgpack: model.args
\t$(P) --run tiny resolve $$(cat model.args)
$(RUN)/configure.msgpack: $(RUN)/resolve.msgpack configure.args
\t$(P) configure tiny $$(cat configure.args)
$(RUN)/tokenize-prep.msgpack: $(RUN)/configure.msgpack
\t$(P) tokenize-prep tiny
$(RUN)/fetch-weights.msgpack: $(RUN)/configure.msgpack
\t$(P) fetch-weights tiny
"""


def _make(cwd: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        ["make", "-C", str(cwd), "--no-print-directory"], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.splitlines()


def _stages_run(lines: list[str]) -> list[str]:
    """The prestage commands make executed, as stage names."""
    found = []
    for line in lines:
        m = re.search(
            r"-m prestage --artifacts arts (?:--run tiny )?(resolve|configure|tokenize-prep|fetch-weights)", line
        )
        if m:
            found.append(m.group(1))
    return found


def _mtimes(run: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in run.glob("*.msgpack")}


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_make_chain_runs_nothing_twice_and_only_dependents(tmp_path, checkpoint_dirs):
    work = tmp_path / "work"
    work.mkdir()
    model = shutil.copytree(checkpoint_dirs["single"], work / "model")
    (work / "Makefile").write_text(MAKEFILE.format(python=sys.executable))
    (work / "model.args").write_text(f"{model}\n")
    (work / "configure.args").write_text("--dtype auto\n")
    run = work / "arts" / "tiny"

    assert _stages_run(_make(work)) == ["resolve", "configure", "tokenize-prep", "fetch-weights"]
    first = _mtimes(run)
    assert set(first) == {"resolve.msgpack", "configure.msgpack", "tokenize-prep.msgpack", "fetch-weights.msgpack"}

    assert _stages_run(_make(work)) == []  # everything is up to date
    assert _mtimes(run) == first

    # Touch an input without changing it: make re-runs configure, which finds nothing to do and leaves its
    # manifest untouched, so neither tokenize-prep nor fetch-weights runs, and resolve never did.
    time.sleep(0.02)
    (work / "configure.args").touch()
    assert _stages_run(_make(work)) == ["configure"]
    assert _mtimes(run) == first

    # Change the input: configure and what depends on it re-run; resolve does not.
    (work / "configure.args").write_text("--dtype float32\n")
    ran = _stages_run(_make(work))
    assert ran[0] == "configure" and sorted(ran[1:]) == ["fetch-weights", "tokenize-prep"]
    after = _mtimes(run)
    assert after["resolve.msgpack"] == first["resolve.msgpack"]
    assert after["configure.msgpack"] != first["configure.msgpack"]
