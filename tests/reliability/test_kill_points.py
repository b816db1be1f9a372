"""SIGKILL at random points of `prestage run --to fetch-weights` during a throttled download, then a plain
re-run: it exits 0 and writes the same manifests (outside `volatile`) as a run that was never killed, and
resumes what the killed run left instead of downloading it all again.

The RNG is seeded, the kill points are bounded (KILLS of them), and each wait is bounded in time.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from prestage.stages import hub as hubmod
from tests.reliability.conftest import popen, stable_manifests

REPO = "test-org/tiny-sharded"
KILLS = 20  # the README's Guarantees quote this number
SEED = 14
RATE = 700_000  # bytes/s per connection while a kill may land: about 0.4 s per shard
WINDOW_S = 0.5  # a kill lands uniformly within this long after the first weight byte left the hub


def _shards(hub) -> dict[str, int]:
    return {p: e.size for p, e in hub.files(REPO).items() if p.endswith(".safetensors")}


def _forget_weights(cache: Path, run_dir: Path, shards) -> None:
    """Drop fetch-weights' manifest and the shards' cached copies (not the partial files a kill left)."""
    (run_dir / "fetch-weights.msgpack").unlink(missing_ok=True)
    snap = next((cache / ("models--" + REPO.replace("/", "--")) / "snapshots").iterdir())
    for rel in shards:
        hubmod.remove_cached(snap, rel)


def _weights_bytes_served(hub, shards) -> int:
    return sum(n for key, n in hub.bytes_served.items() if key.rsplit("/", 1)[-1] in shards)


@pytest.mark.slow
def test_random_kill_points_then_a_plain_rerun(bad_hub, cli, hf_env, tmp_path):
    hub = bad_hub.hub
    shards = _shards(hub)
    artifacts = tmp_path / "artifacts"
    cache = Path(hf_env["HF_HUB_CACHE"])
    args = ["-q", "--artifacts", artifacts, "--run", "k", "run", REPO, "--to", "fetch-weights"]
    rc, _, err = cli(args, hf_env)
    assert rc == 0, err
    run_dir = artifacts / "k"
    reference = stable_manifests(run_dir)
    assert set(reference) == {"resolve", "configure", "tokenize-prep", "fetch-weights"}

    rng = random.Random(SEED)
    landed_mid_download = 0
    for i in range(KILLS):
        _forget_weights(cache, run_dir, shards)
        hub.reset_counters()
        hub.throttle(RATE)
        proc = popen(args, hf_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while _weights_bytes_served(hub, shards) == 0 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, WINDOW_S))
            alive = proc.poll() is None
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        landed_mid_download += alive
        time.sleep(0.2)  # the hub's handlers of the dead connections fail their next write (each sleeps < 0.1 s)
        before = _weights_bytes_served(hub, shards)
        hub.throttle(None)
        hub.reset_counters()
        rc, _, err = cli(args, hf_env)
        assert rc == 0, f"kill {i}: the re-run failed: {err}"
        assert stable_manifests(run_dir) == reference, f"kill {i}: the manifests differ from a run never killed"
        # the re-run resumed: it fetched at most what the killed run had not (plus one lost chunk per file)
        again = _weights_bytes_served(hub, shards)
        assert again <= sum(shards.values()) - before + len(shards) * 128 * 1024, (i, before, again)
        assert not list(cache.rglob("*.incomplete")), f"kill {i}: a partial file was left after the re-run"
    assert landed_mid_download >= KILLS * 3 // 4, f"only {landed_mid_download} of {KILLS} kills hit a running fetch"
