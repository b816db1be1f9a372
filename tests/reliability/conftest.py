"""Fixtures of the fault suite: a misbehaving hub, the CLI as a subprocess, and manifest comparison.

`bad_hub` is the session's LocalHub (tests/support/hub_server.py, reset around each test) wrapped in
`Misbehave`, which names every fault the suite injects:

    reset(n, match)            drop the connection before any body byte (the next n file GETs)
    error(status, n, match)    answer HTTP `status` (500, 503, ...) to the next n requests
    throttled(n, retry_after)  answer 429 with a Retry-After to the next n requests
    stall(where, match)        accept and never answer ("head", "listing"), or send headers and no body ("body")
    trickle(bytes_per_s)       serve file bodies slowly
    short_body(after, match)   close the connection after `after` bytes of a file
    wrong_bytes(repo, path)    serve a file with one byte flipped (same size)
    hostile_etag / hostile_location(value, match)    send a hostile ETag or redirect for a file
    hostile_names(repo, names) commit files whose names climb out of the repo, returns the sha
    move_branch(repo, files)   commit on main again: the branch moves under a pinned run

`cli(args, env)` runs `python -m prestage` in a subprocess and returns (rc, stdout, stderr).
`stable_manifests(run_dir)` reads every manifest of a run without its volatile section.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from prestage.stages.hub import TIMEOUT_ENV
from prestage.stages.manifest import read
from tests.conftest import REPO_ROOT
from tests.support.hub_server import LocalHub

STAGES = ("resolve", "configure", "tokenize-prep", "fetch-weights")
FAST_TIMEOUT = "0.5"  # PRESTAGE_HUB_TIMEOUT for stall cases: connect and read seconds


@dataclass
class Misbehave:
    hub: LocalHub

    @property
    def url(self) -> str:
        return self.hub.url

    def reset(self, n: int = 1, match: str | None = None) -> None:
        self.hub.cut_next(0, n=n, match=match)

    def error(self, status: int = 500, n: int = 1, match: str | None = None) -> None:
        self.hub.fail_next(n, status=status, match=match)

    def throttled(self, n: int = 1, retry_after: str = "1", match: str | None = None) -> None:
        self.hub.fail_next(n, status=429, match=match, retry_after=retry_after)

    def stall(self, where: str, match: str | None = None) -> None:
        self.hub.stall("body" if where == "body" else "answer", match=match)

    def trickle(self, bytes_per_s: float) -> None:
        self.hub.throttle(bytes_per_s)

    def short_body(self, after: int, match: str | None = None) -> None:
        self.hub.cut_next(after, match=match)

    def wrong_bytes(self, repo: str, path: str) -> None:
        self.hub.corrupt(repo, path)

    def hostile_etag(self, value: str, match: str, lfs: bool = False) -> None:
        self.hub.override_header("X-Linked-Etag" if lfs else "ETag", f'"{value}"', match)

    def hostile_location(self, value: str, match: str) -> None:
        self.hub.override_header("Location", value, match)

    def hostile_names(self, repo: str, base: Path, names: dict[str, bytes]) -> str:
        files = {p.name: p for p in sorted(base.iterdir()) if p.is_file()}
        return self.hub.commit(repo, {**files, **names}, replace=True, message="hostile names")

    def move_branch(self, repo: str, files: dict[str, bytes]) -> str:
        return self.hub.commit(repo, files, message="moved")


@pytest.fixture
def bad_hub(hub) -> Misbehave:
    return Misbehave(hub)


@pytest.fixture
def cli():
    """cli(args, env, timeout=120) -> (rc, stdout, stderr): `python -m prestage ARGS` in a subprocess."""

    def run(args, env: dict, timeout: float = 120, fast: bool = False) -> tuple[int, str, str]:
        full = dict(env)
        full["PYTHONPATH"] = str(REPO_ROOT)
        if fast:
            full[TIMEOUT_ENV] = FAST_TIMEOUT
        p = subprocess.run(
            [sys.executable, "-m", "prestage", *[str(a) for a in args]],
            env=full,
            cwd=str(REPO_ROOT),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return p.returncode, p.stdout, p.stderr

    return run


def popen(args, env: dict, **kw) -> subprocess.Popen:
    full = {**env, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "prestage", *[str(a) for a in args]], env=full, cwd=str(REPO_ROOT), **kw
    )


def stable_manifests(run_dir: Path) -> dict:
    """{stage: manifest without its volatile section} for every manifest of the run."""
    return {
        s: read(Path(run_dir) / f"{s}.msgpack").stable() for s in STAGES if (Path(run_dir) / f"{s}.msgpack").exists()
    }


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def files_under(*roots: Path):
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                yield Path(dirpath) / f
