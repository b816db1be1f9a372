"""A branch that moved on the hub: the cache-first rule said out loud, `--refresh` / `--force` follow the branch.

Each test commits its own repo on the session's local hub (the shared test-org repos never move), runs the
real CLI in subprocesses (what is said on stderr is the point), and moves `main` with a new commit.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest

from prestage.stages import hub as hubmod
from prestage.stages.errors import CODE
from prestage.stages.manifest import manifest_path, read
from tests.conftest import REPO_ROOT

_N = itertools.count()


@pytest.fixture
def moving_repo(hub, checkpoint_dirs) -> tuple[str, str]:
    """(repo id, first commit of main): a fresh repo holding the tiny single-file checkpoint."""
    repo = f"refresh/moving-{next(_N)}-{id(hub) % 10_000}"
    return repo, hub.commit(repo, checkpoint_dirs["single"], message="first")


def cli(args, env, timeout=180):
    full = {**env, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "prestage", *map(str, args)],
        env=full,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def commit_of(arts: Path, run: str) -> str:
    return read(manifest_path(arts / run, "resolve")).outputs["commit"]


def stage_lines(err: str) -> dict[str, str]:
    """{stage: "running" | "cached"} from the runner's lines on stderr."""
    out = {}
    for m in re.finditer(r"^([a-z-]+): (running|cached)", err, re.M):
        out[m.group(1)] = m.group(2)
    return out


def test_plain_run_says_the_cached_commit_and_refresh_follows_the_branch(hub, hf_env, moving_repo, tmp_path):
    repo, old = moving_repo
    run = repo.replace("/", "--")
    arts = tmp_path / "arts"
    first = cli(["--artifacts", arts, "run", repo], hf_env)
    assert first.returncode == 0, first.stderr
    assert f"resolve: main -> {old} (asked the hub)" in first.stderr
    new = hub.commit(repo, {"README.md": "main moved\n"}, message="second")
    assert new != old

    # cache-first: neither the reused manifest nor a new run asks the hub, and both say which commit they used
    hub.reset_counters()
    plain = cli(["--artifacts", arts, "run", repo], hf_env)
    assert plain.returncode == 0, plain.stderr
    note = re.search(
        rf"^resolve: main -> {old} \(from the cache, resolved (\d{{4}}-\d\d-\d\d \d\d:\d\d UTC); "
        r"--refresh asks the hub\)$",
        plain.stderr,
        re.M,
    )
    assert note, plain.stderr
    fresh = cli(["--artifacts", arts, "run", repo, "--run", "other", "--to", "resolve"], hf_env)
    assert fresh.returncode == 0 and f"resolve: main -> {old} (from the cache, resolved" in fresh.stderr
    assert sum(hub.requests.values()) == 0 and commit_of(arts, run) == commit_of(arts, "other") == old

    # --refresh asks the hub, pins the new commit, and every later stage re-runs on it
    hub.reset_counters()
    r = cli(["--artifacts", arts, "run", repo, "--refresh"], hf_env)
    assert r.returncode == 0, r.stderr
    assert f"resolve: main -> {new} (asked the hub; the cache had {old[:12]})" in r.stderr
    assert commit_of(arts, run) == new
    assert stage_lines(r.stderr) == dict.fromkeys(["resolve", "configure", "tokenize-prep", "fetch-weights"], "running")
    weights = read(manifest_path(arts / run, "fetch-weights")).outputs
    assert weights["folder"] == hubmod.snapshot_rel(repo, new)
    # the weights' blob was already in the cache (same sha256 under the old commit): linked, not downloaded
    assert not any(k.endswith(".safetensors") for k in hub.bytes_served)
    assert "downloading" not in r.stderr and "are in the cache" in r.stderr

    # a run still on the old commit sees the cache's branch moved: it re-runs resolve from the cache
    status = cli(["--artifacts", arts, "status", "other"], hf_env)
    assert f"main now points to {new[:12]} in the cache" in status.stdout, status.stdout
    again = cli(["--artifacts", arts, "resolve", repo, "--run", "other"], hf_env)
    assert again.returncode == 0 and commit_of(arts, "other") == new, again.stderr

    # --refresh again with nothing new on the hub: resolve asks, finds the same commit, the rest stays cached
    same = cli(["--artifacts", arts, "run", repo, "--refresh"], hf_env)
    assert same.returncode == 0, same.stderr
    assert f"resolve: main -> {new} (asked the hub)" in same.stderr
    assert stage_lines(same.stderr) == {
        "resolve": "running",
        "configure": "cached",
        "tokenize-prep": "cached",
        "fetch-weights": "cached",
    }


def test_force_asks_the_hub_and_a_commit_revision_never_does(hub, hf_env, moving_repo, tmp_path):
    repo, old = moving_repo
    run = repo.replace("/", "--")
    arts = tmp_path / "arts"
    assert cli(["--artifacts", arts, "resolve", repo], hf_env).returncode == 0
    new = hub.commit(repo, {"README.md": "moved\n"}, message="second")
    r = cli(["--artifacts", arts, "resolve", repo, "--force"], hf_env)
    assert r.returncode == 0 and commit_of(arts, run) == new, r.stderr
    assert f"resolve: main -> {new} (asked the hub; the cache had {old[:12]})" in r.stderr

    hub.reset_counters()  # a 40-hex revision is its own commit: --refresh has nothing to ask
    r = cli(["--artifacts", arts, "resolve", repo, "--revision", old, "--refresh", "--run", "pinned"], hf_env)
    assert r.returncode == 0, r.stderr
    assert commit_of(arts, "pinned") == old and "from the cache" not in r.stderr and "asked the hub" not in r.stderr
    assert sum(hub.requests.values()) == 0, hub.request_log


@pytest.mark.parametrize("how", ["flag", "env"])
def test_offline_refresh_is_one_offline_miss_line(hub, hf_env, moving_repo, tmp_path, how):
    repo, _ = moving_repo
    arts = tmp_path / "arts"
    assert cli(["--artifacts", arts, "resolve", repo], hf_env).returncode == 0
    env = {**hf_env, "HF_HUB_OFFLINE": "1"} if how == "env" else hf_env
    extra = ["--offline"] if how == "flag" else []
    hub.reset_counters()
    r = cli(["--artifacts", arts, "--run", "off", "run", repo, "--refresh", *extra], env)
    assert r.returncode == CODE["offline-miss"], r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prestage: error: --refresh"), r.stderr
    assert ("--offline" if how == "flag" else "HF_HUB_OFFLINE=1") in lines[0]
    assert not (arts / "off").exists() and sum(hub.requests.values()) == 0  # refused before any stage ran
    # --force offline is no contradiction: it re-runs from the cache and says so
    r = cli(["--artifacts", arts, "--run", "off", "resolve", repo, "--force", *extra], env)
    assert r.returncode == 0 and "(from the cache, resolved" in r.stderr, r.stderr
