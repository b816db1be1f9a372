"""No network on the air-gapped side: launch, `run --from launch` and serve of an unbundled run open no connection.

Each runs in a subprocess with HF_HUB_OFFLINE=1 under tests/support/socket_guard (every Internet connection and
name lookup refused and recorded), and the record must stay empty; a control shows the guard does catch and
refuse a connection. Where the machine allows `unshare -n` (a network namespace with no interface but a downed
loopback), launch also runs there.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.support.airgap import PROMPT, REPO, Connected, build_connected
from tests.support.airgap import cli as _cli
from tests.support.airgap import show as _show

GUARD = REPO_ROOT / "tests" / "support" / "socket_guard"


@pytest.fixture(scope="module")
def connected(hub_session, tmp_path_factory) -> Connected:
    return build_connected(hub_session, tmp_path_factory)


@pytest.fixture
def airgapped(connected, tmp_path):
    """(env, artifacts, log): the bundle unbundled into a fresh place, and the guarded offline environment."""
    arts, cache, log = tmp_path / "arts", tmp_path / "cache", tmp_path / "guard.jsonl"
    env = connected.offline_env(cache)
    r = _cli(["--artifacts", arts, "unbundle", connected.tar], env)
    assert r.returncode == 0, _show(r)
    hidden = connected.cache.with_name("cache-hidden-nn")
    connected.cache.rename(hidden)  # resolve's volatile hint must find nothing on this side
    guarded = {
        **env,
        "PYTHONPATH": os.pathsep.join([str(GUARD), str(REPO_ROOT)]),
        "PRESTAGE_SOCKET_GUARD_LOG": str(log),
    }
    try:
        yield guarded, arts, log
    finally:
        hidden.rename(connected.cache)


def _attempts(log: Path) -> list[dict]:
    """The recorded connection attempts (the guard must have been loaded in at least one process)."""
    assert Path(str(log) + ".loaded").read_text().split(), "the socket guard was not loaded"
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def test_the_guard_refuses_and_records_a_connection(tmp_path):
    log = tmp_path / "guard.jsonl"
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        code = (
            "import socket, urllib.request\n"
            f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\nexcept ConnectionRefusedError:\n"
            "    print('refused')\n"
            "try:\n    urllib.request.urlopen('http://huggingface.co/', timeout=2)\nexcept Exception as e:\n"
            "    print('lookup refused' if 'socket guard' in str(e) else repr(e))\n"
        )
        env = {**os.environ, "PYTHONPATH": str(GUARD), "PRESTAGE_SOCKET_GUARD_LOG": str(log)}
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.stdout.split() == ["refused", "lookup", "refused"], p.stdout + p.stderr
    kinds = [a["kind"] for a in _attempts(log)]
    assert kinds == ["connect", "getaddrinfo"], kinds


def test_launch_and_run_from_launch_make_no_connection(connected, airgapped):
    env, arts, log = airgapped
    r = _cli(["--artifacts", arts, "launch", "r", "--json", *PROMPT], env)
    assert r.returncode == 0, _show(r)
    assert json.loads(r.stdout)["completions"][0]["token_ids"] == connected.tokens
    r = _cli(["--artifacts", arts, "--run", "r", "run", REPO, "--from", "launch", "--json", *PROMPT], env)
    assert r.returncode == 0, _show(r)
    assert json.loads(r.stdout)["completions"][0]["token_ids"] == connected.tokens
    assert _attempts(log) == []


def test_serve_makes_no_connection(connected, airgapped):
    env, arts, log = airgapped
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "prestage", "--artifacts", str(arts), "serve", "r", "--port", str(port)]
    proc = subprocess.Popen(argv + ["--device", "cpu"], env=env, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline, body = time.monotonic() + 120, None
        req = {"model": REPO, "prompt": "Hello", "max_tokens": 6, "temperature": 0}
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                rq = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/completions",
                    data=json.dumps(req).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(rq, timeout=60) as resp:
                    body = json.loads(resp.read())
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None, proc.stderr.read() if proc.poll() is not None else "serve did not answer in 120 s"
        assert body["choices"][0]["text"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    assert _attempts(log) == []


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="this machine does not allow `unshare -n` (no network namespace)")
def test_launch_in_a_namespace_with_no_network(connected, airgapped):
    env, arts, log = airgapped
    env = {k: v for k, v in env.items() if k != "PRESTAGE_SOCKET_GUARD_LOG"}
    argv = [sys.executable, "-m", "prestage", "--artifacts", str(arts), "launch", "r", "--json", *PROMPT]
    p = subprocess.run(["unshare", "-n", *argv], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["completions"][0]["token_ids"] == connected.tokens
