"""A run is relocatable: manifests hold no absolute path (stages/paths.py decides where the cache is).

Made against the local hub with `--download-dir A`, then the run folder and the cache are moved elsewhere
(the cache to B; A is left without its weights) and the hub is out of reach: launch works offline from B, found through
HF_HUB_CACHE=B or `--download-dir B`, and every stage stays fresh (nothing re-runs, nothing is fetched).
"""

from __future__ import annotations

import json
import shutil
import socket

from prestage.stages.manifest import read


def _dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _no_absolute_path(doc, roots) -> None:
    text = json.dumps({k: doc[k] for k in ("inputs", "outputs", "upstream", "warnings")}, default=str)
    for root in roots:
        assert str(root) not in text, f"{root} recorded in a manifest"


def test_moved_run_and_cache_launch_offline_from_the_new_place(hub, hf_env, prestage, tmp_path):
    a, arts = tmp_path / "cache-a", tmp_path / "arts"
    made = prestage(
        [
            "--artifacts",
            arts,
            "--run",
            "r",
            "run",
            "test-org/tiny-single",
            "--download-dir",
            a,
            "--prompt",
            "Hello",
            "--max-tokens",
            "6",
            "--device",
            "cpu",
        ],
        env=hf_env,
    )
    assert made.rc == 0, made
    want = json.loads(
        prestage(
            ["--artifacts", arts, "launch", "r", "--json", "--prompt", "Hello", "--max-tokens", "6", "--device", "cpu"],
            env=hf_env,
        ).stdout
    )["outputs"]["completions"][0]["token_ids"]
    for stage in ("resolve", "configure", "tokenize-prep", "fetch-weights"):
        _no_absolute_path(read(arts / "r" / f"{stage}.msgpack").to_dict(), [tmp_path])

    b, moved = tmp_path / "elsewhere" / "cache-b", tmp_path / "elsewhere" / "arts"
    b.parent.mkdir()
    shutil.copytree(a, b, symlinks=True)
    shutil.move(arts, moved)
    # A stays behind on this host without its weights: a cache named by HF_HUB_CACHE / --download-dir that holds
    # the model wins over the hint resolve kept (A), so nothing is found missing
    for blob in (a / "models--test-org--tiny-single" / "blobs").iterdir():
        if blob.stat().st_size > 100_000:
            blob.unlink()
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    offline = {**hf_env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": _dead_endpoint()}
    hub.reset_counters()
    for how, env, extra in (
        ("HF_HUB_CACHE", {**offline, "HF_HUB_CACHE": str(b)}, []),
        ("--download-dir", {**offline, "HF_HUB_CACHE": str(empty)}, ["--download-dir", b]),
    ):
        st = prestage(["--artifacts", moved, "status", "r", "--json", *extra], env=env)
        r = prestage(
            [
                "--artifacts",
                moved,
                "--run",
                "r",
                "run",
                "test-org/tiny-single",
                "--json",
                "--prompt",
                "Hello",
                "--max-tokens",
                "6",
                "--device",
                "cpu",
                *extra,
            ],
            env=env,
        )
        assert r.rc == 0, (how, str(r))
        out = json.loads(r.stdout)
        assert [s["status"] for s in out["stages"]] == ["cached"] * 4 + ["ran"], (how, out["stages"])
        assert out["launch"]["completions"][0]["token_ids"] == want, how
        assert all(row["state"] == "fresh" for row in json.loads(st.stdout)["stages"][:4]), (how, st.stdout)
    assert sum(hub.requests.values()) == 0
    assert not list(empty.iterdir())
