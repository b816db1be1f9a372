"""The one way tests run the prestage command line: in-process by default, a child process where that is the point.

- `run_cli(args, env=None, cwd=None, timeout=300)` -> CliResult: `prestage.runner.cli.main(args)` in this
  process, inside click's CliRunner isolation (stdout and stderr captured, empty stdin), exit code from its
  SystemExit. No interpreter start and no re-import of torch/transformers per call, which is most of a CLI
  test's time.
  `env` is a whole environment, as a child process would get it: os.environ becomes exactly `env` for the
  call, huggingface_hub's import-time constants follow it, and afterwards os.environ, those constants and the
  working directory are put back, whatever the CLI changed (it sets HF_ENDPOINT / HF_HUB_OFFLINE itself).
  A call still running after `timeout` seconds is interrupted (SIGALRM) and fails the test, as a child
  process would be killed.
- `popen_cli(args, env=None, cwd=None, **popen_kwargs)` -> subprocess.Popen of `python -m prestage ARGS`: only
  where a real process is the point (signals, a killed process, processes racing for a lock, a server).
- `child_env(env=None)`: the environment for any child Python process of a test (import-lightness checks).

`args` is a list (Paths allowed) or a shell-like string; `env` defaults to the current os.environ (so the
hf_env fixture applies). Child processes get the repository root first on PYTHONPATH.
"""

from __future__ import annotations

import os
import shlex
import signal
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


class CliTimeout(BaseException):
    """Raised by the alarm in a CLI call that ran too long (a BaseException: the CLI's own handlers let it pass)."""


def _alarm(signum, frame):
    raise CliTimeout


def run_cli(args, env: dict[str, str] | None = None, cwd=None, timeout: float = 300) -> CliResult:
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
                previous = signal.signal(signal.SIGALRM, _alarm)
                signal.setitimer(signal.ITIMER_REAL, timeout)
                try:
                    main(argv)
                except SystemExit as e:
                    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except CliTimeout:
                    pytest.fail(f"prestage {' '.join(argv)} still running after {timeout} s", pytrace=False)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    signal.signal(signal.SIGALRM, previous)
                    sys.stdout.flush()
                    sys.stderr.flush()
                stdout, stderr = out.getvalue(), err.getvalue()
        finally:
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
    return CliResult(rc=rc, stdout=stdout.decode(), stderr=stderr.decode(), args=argv)


def popen_cli(args, env: dict[str, str] | None = None, cwd=None, **popen_kwargs) -> subprocess.Popen:
    """Start `python -m prestage ARGS` in a child process and return it (stdout/stderr as popen_kwargs say)."""
    return subprocess.Popen(
        [sys.executable, "-m", "prestage", *_argv(args)],
        env=child_env(env),
        cwd=str(cwd or REPO_ROOT),
        **popen_kwargs,
    )
