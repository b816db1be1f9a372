"""Processes racing each other: 4 concurrent runs sharing one cache download every file once and write the
same manifests; the stored tokenizer's final rename, raced by 4 processes, succeeds for every one of them
and always leaves one whole folder.
"""

from __future__ import annotations

import multiprocessing
import subprocess
from pathlib import Path

import pytest

from tests.reliability.conftest import popen, stable_manifests

REPO = "test-org/tiny-sharded"
RUNS = 4  # the README's Guarantees quote this number


@pytest.mark.slow
def test_concurrent_runs_share_one_cache_and_download_once(bad_hub, hf_env, tmp_path):
    hub = bad_hub.hub
    hub.throttle(2_000_000)  # slow enough that the runs overlap in the download
    artifacts = tmp_path / "artifacts"
    procs = [
        popen(
            ["-q", "--artifacts", artifacts, "--run", f"r{i}", "run", REPO, "--to", "fetch-weights"],
            hf_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(RUNS)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert all(rc == 0 for rc, _ in results), results
    files = hub.files(REPO)
    served = hub.bytes_served
    for rel, e in files.items():
        got = served.get(f"{REPO}/{rel}", 0)
        assert got in (0, e.size), f"{rel}: {got} bytes served for a {e.size}-byte file"
    weights = [rel for rel in files if rel.endswith(".safetensors")]
    assert all(served.get(f"{REPO}/{rel}") == files[rel].size for rel in weights)
    first = stable_manifests(artifacts / "r0")
    for i in range(1, RUNS):
        assert stable_manifests(artifacts / f"r{i}") == first, f"run r{i} recorded something else than r0"


class _SavedTokenizer:
    """What store.save needs of a tokenizer: save_pretrained(folder) writing its files."""

    def save_pretrained(self, folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "tokenizer.json").write_text("x" * 1000)
        (Path(folder) / "tokenizer_config.json").write_text("{}")


def _save_many(run_dir: str, source: str, rounds: int, queue) -> None:
    from prestage.stages.tokenize_prep import store

    failures = []
    for _ in range(rounds):
        try:
            store.save(Path(run_dir), _SavedTokenizer(), Path(source), None)
        except Exception as e:  # noqa: BLE001 - collected: the test wants none
            failures.append(f"{type(e).__name__}: {e}")
    queue.put(failures)


def test_the_stored_tokenizer_save_tolerates_racing_processes(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "tokenizer.json").write_text("x" * 1000)
    run_dir = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_save_many, args=(str(run_dir), str(source), 100, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    failures = [f for _ in procs for f in queue.get(timeout=120)]
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert failures == []
    final = run_dir / "tokenizer"
    assert sorted(p.name for p in final.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["tokenizer"]  # no temporary folder left
