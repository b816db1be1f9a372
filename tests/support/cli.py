"""The one way tests run the prestage command line: in-process by default, a child process where that is the point.

- `run_cli(args, env=None, cwd=None)` -> CliResult: `prestage.runner.cli.main(args)` in this process, inside
  click's CliRunner isolation (stdout and stderr captured, empty stdin), exit code from its SystemExit. No
  interpreter start and no re-import of torch/transformers per call, which is most of a CLI test's time.
  `env` is a whole environment, as a child process would get it: os.environ becomes exactly `env` for the
  call, huggingface_hub's import-time constants follow it, and afterwards os.environ, those constants and the
  working directory are put back, whatever the CLI changed (it sets HF_ENDPOINT / HF_HUB_OFFLINE itself).
- `run_cli_subprocess(args, env=None, cwd=None, timeout=300)` -> CliResult: `python -m prestage ARGS` in a
  child process. Only for what needs a real process: import lightness, a process's real stdout, signals,
  several processes at once.
- `popen_cli(args, env=None, **popen_kwargs)` -> subprocess.Popen of that same command, for tests that signal
  or race processes.

`args` is a list (Paths allowed) or a shell-like string; `env` defaults to the current os.environ (so the
hf_env fixture applies). Child processes get the repository root first on PYTHONPATH.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class CliResult:
    """Outcome of one prestage command: exit code, captured stdout and stderr, the arguments."""

    rc: int
    stdout: str
    stderr: str
    args: list[str]

    @property
    def returncode(self) -> int:
        """`rc` under subprocess's name."""
        return self.rc

    def __str__(self) -> str:
        return f"prestage {' '.join(self.args)} -> rc={self.rc}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def _argv(args) -> list[str]:
    return shlex.split(args) if isinstance(args, str) else [str(a) for a in args]


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default os.environ) with the repository root first on PYTHONPATH, for a child process."""
    full = dict(os.environ if env is None else env)
    rest = [p for p in full.get("PYTHONPATH", "").split(os.pathsep) if p]
    full["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *rest])
    return full


def _follow_env_in_hf_modules(mp: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """huggingface_hub reads its env at import: point its constants at `env` (offline included) for one call."""
    from tests.conftest import _patch_hf_modules

    _patch_hf_modules(mp, env)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants

        offline = (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").strip().lower()
        mp.setattr(constants, "HF_HUB_OFFLINE", offline in {"1", "on", "yes", "true", "y"})


def run_cli(args, env: dict[str, str] | None = None, cwd=None) -> CliResult:
    """Run the CLI in this process (see the module docstring)."""
    from click.testing import CliRunner

    from prestage.runner.cli import main

    argv = _argv(args)
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    rc = 0
    with pytest.MonkeyPatch.context() as mp:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        _follow_env_in_hf_modules(mp, dict(os.environ))
        runner = CliRunner()
        try:
            with runner.isolation() as (out, err, _):
                os.chdir(cwd or REPO_ROOT)
                try:
                    main(argv)
                except SystemExit as e:
                    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                stdout, stderr = out.getvalue(), err.getvalue()
        finally:
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
    return CliResult(rc=rc, stdout=stdout.decode(), stderr=stderr.decode(), args=argv)


def run_cli_subprocess(args, env: dict[str, str] | None = None, cwd=None, timeout: float = 300) -> CliResult:
    """Run `python -m prestage ARGS` in a child process and wait for it."""
    argv = _argv(args)
    proc = subprocess.run(
        [sys.executable, "-m", "prestage", *argv],
        env=child_env(env),
        cwd=str(cwd or REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return CliResult(rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr, args=argv)


def popen_cli(args, env: dict[str, str] | None = None, cwd=None, **popen_kwargs) -> subprocess.Popen:
    """Start `python -m prestage ARGS` in a child process and return it (stdout/stderr as popen_kwargs say)."""
    return subprocess.Popen(
        [sys.executable, "-m", "prestage", *_argv(args)],
        env=child_env(env),
        cwd=str(cwd or REPO_ROOT),
        **popen_kwargs,
    )
