"""Download progress: every network chunk moves the bar, one decimal unit system in bars and log lines, and
nothing announced for bytes the cache already holds.

The bar is drawn only when asked for (the test environment sets HF_HUB_DISABLE_PROGRESS_BARS=1); here the
variable is dropped for the CLI in a subprocess and its stderr read back.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prestage.runner.chain import run_stage
from prestage.stages import hub as hubmod
from prestage.stages.base import Reporter
from prestage.stages.manifest import manifest_path, read
from prestage.stages.units import size_text
from tests.conftest import REPO_ROOT

QUIET = Reporter(quiet=True)
_PREFIX = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}


@pytest.fixture
def four_mb_repo(hub, tmp_path_factory) -> str:
    """progress/four-mb: a Llama-shaped checkpoint of about 4 MB in one shard (committed once per session)."""
    from tests.support.checkpoints import build_large_checkpoint

    repo = "progress/four-mb"
    if not getattr(hub, "_progress_built", False):
        folder = tmp_path_factory.mktemp("four-mb")
        hub.commit(repo, build_large_checkpoint(folder, total_bytes=4e6, num_shards=1, fill="random"))
        shutil.rmtree(folder)
        hub._progress_built = True
    return repo


def cli(args, env, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "prestage", *map(str, args)],
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bar_counts(err: str) -> list[tuple[float, float]]:
    """(bytes so far, total bytes) of every bar state tqdm drew (they are separated by carriage returns)."""
    found = re.findall(r"(\d+(?:\.\d+)?)([kMG]?)B/(\d+(?:\.\d+)?)([kMG]?)B \[", err)
    return [(float(a) * _PREFIX[pa], float(b) * _PREFIX[pb]) for a, pa, b, pb in found]


def test_throttled_download_moves_the_bar_by_bytes_in_the_log_units(hub, hf_env, four_mb_repo, tmp_path):
    arts = tmp_path / "arts"
    params = {"model": four_mb_repo}
    run_stage("resolve", arts / "m", params, QUIET)
    run_stage("configure", arts / "m", params, QUIET)
    env = {k: v for k, v in hf_env.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    hub.throttle(2e6)  # about 2 s for the 4 MB shard
    r = cli(["--artifacts", arts, "fetch-weights", "m"], env)
    hub.throttle(None)
    assert r.returncode == 0, r.stderr
    total = sum(f["size"] for f in read(manifest_path(arts / "m", "fetch-weights")).outputs["files"])
    announced = re.search(r"fetch-weights: downloading 1 of 1 file\(s\) of \S+ \(([\d.]+) ([kMG]B)\)", r.stderr)
    assert announced and " ".join(announced.groups()) == size_text(total), r.stderr
    # the bar's total is written with the same digits and unit as the log line ("4.00MB" and "4.00 MB")
    assert f"/{size_text(total).replace(' ', '')} [" in r.stderr, r.stderr

    counts = bar_counts(r.stderr)
    assert counts, r.stderr
    assert all(abs(t - total) <= 0.01 * total for _, t in counts), counts  # the bar's total is the log's MB
    between = sorted({n for n, _ in counts if 0 < n < total})
    assert len(between) >= 3, counts  # it moved while the bytes came, not once at the end (nor in 10 MiB steps)
    assert any(abs(n - total) <= 0.01 * total for n, _ in counts)  # and it ends at the total
    assert "MiB" not in r.stderr and re.search(r"[\d.]+[kM]B/s", r.stderr), r.stderr  # one decimal unit system

    # the same files again: nothing to download, nothing announced, no bar
    again = cli(["--artifacts", arts, "fetch-weights", "m", "--force"], env)
    assert again.returncode == 0, again.stderr
    assert "downloading" not in again.stderr and not bar_counts(again.stderr)
    assert "fetch-weights: all 1 file(s) of" in again.stderr and "are in the cache" in again.stderr


def test_progress_callback_gets_every_network_chunk(hub, hf_env, four_mb_repo):
    s = hubmod.settings({})
    commit = hub.resolve(four_mb_repo)
    shard = next(p for p in hub.files(four_mb_repo) if p.endswith(".safetensors"))
    size = hub.file_entry(four_mb_repo, shard).size
    calls: list[int] = []
    hub.throttle(8e6)  # the hub sends about 400 kB at a time at this rate
    path = hubmod.HubClient(s, QUIET).download(four_mb_repo, shard, commit, progress=calls.append)
    assert Path(path).stat().st_size == size and sum(calls) == size
    assert len(calls) >= 10 and max(calls) < size // 4, calls[:20]

    calls.clear()  # a blob already in the cache: no transfer, no progress
    hubmod.HubClient(s, QUIET).download(four_mb_repo, shard, commit, progress=calls.append)
    assert calls == []


@pytest.mark.parametrize("n", [512, 1000, 9_994, 99_949, 824_123, 4_000_000, 40_200_000, 999_600, 1_200_000_000])
def test_log_sizes_have_the_digits_and_unit_of_the_bar(n):
    from tqdm import tqdm

    assert size_text(n).replace(" ", "") == tqdm.format_sizeof(n, "B", 1000)
