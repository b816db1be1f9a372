"""The connected side of the air-gapped tests: one run made against the local hub, bundled as a folder and a tar.

`build_connected(hub_session, tmp_path_factory)` (for a module-scoped `connected` fixture) runs
`prestage run test-org/tiny-single --prompt ...` against the hub with
its own cache and artifacts, records the greedy tokens, and writes `out/b` (folder) and `out/b.tar`.
`Connected.offline_env(cache)` is the air-gapped side's environment: HF_HUB_OFFLINE=1, a dead endpoint, the
given (fresh) cache. `cli(args, env)` runs the CLI in a subprocess.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from prestage.stages.manifest import read
from tests.conftest import REPO_ROOT

REPO = "test-org/tiny-single"
PROMPT = ["--prompt", "Hello", "--max-tokens", "6", "--device", "cpu"]


def dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def cli(args, env, timeout=300):
    argv = [str(a) for a in args]
    full = {**env, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    p = subprocess.run(
        [sys.executable, "-m", "prestage", *argv],
        env=full,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    p.args = argv
    return p


def show(p) -> str:
    return (
        f"prestage {' '.join(p.args)} -> {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"
    )


def hub_env(root: Path, hub_url: str, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")}
    (root / "hf_home").mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    env.update(
        HF_ENDPOINT=hub_url,
        HF_HOME=str(root / "hf_home"),
        HF_HUB_CACHE=str(cache),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        DISABLE_SAFETENSORS_CONVERSION="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    return env


class Connected:
    """The connected side: a run made against the hub, and its bundles."""

    def __init__(self, root, env, arts, cache, tokens, commit, dir_bundle, tar_bundle):
        self.root, self.env, self.arts, self.cache = root, env, arts, cache
        self.tokens, self.commit, self.dir, self.tar = tokens, commit, dir_bundle, tar_bundle

    def offline_env(self, cache: Path) -> dict:
        cache.mkdir(parents=True, exist_ok=True)
        return {**self.env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": dead_endpoint(), "HF_HUB_CACHE": str(cache)}


def build_connected(hub_session, tmp_path_factory) -> Connected:
    """The connected side (use it from a module-scoped fixture named `connected`)."""
    root = tmp_path_factory.mktemp("connected")
    cache, arts = root / "cache", root / "arts"
    env = hub_env(root, hub_session.url, cache)
    made = cli(["--artifacts", arts, "--run", "r", "run", REPO, "--json", *PROMPT], env)
    assert made.returncode == 0, show(made)
    tokens = json.loads(made.stdout)["completions"][0]["token_ids"]
    commit = read(arts / "r" / "resolve.msgpack").to_dict()["outputs"]["commit"]
    out = root / "out"
    out.mkdir()
    for fmt, name in (("dir", "b"), ("tar", "b.tar")):
        r = cli(["--artifacts", arts, "bundle", "r", "-o", out / name, "--format", fmt, "--json"], env)
        assert r.returncode == 0, show(r)
        summary = json.loads(r.stdout)
        assert summary["format"] == fmt and summary["files"] > 10, summary
    return Connected(root, env, arts, cache, tokens, commit, out / "b", out / "b.tar")
