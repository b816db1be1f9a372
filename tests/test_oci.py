"""OCI: `bundle --format oci` (an OCI image layout with the ModelPack media types), and push/pull through a real
registry (Debian's `docker-registry`, the reference distribution registry, started here on 127.0.0.1).

The layout is unbundled and launched like any bundle; a run pushed to the registry, pulled into a fresh place
and unbundled into a fresh cache launches with the same greedy tokens, with no hub and HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from prestage.stages.errors import CODE
from tests.support.airgap import PROMPT, Connected, build_connected
from tests.support.airgap import cli as _cli
from tests.support.airgap import show as _show

REGISTRY = shutil.which("docker-registry") or (
    "/usr/bin/docker-registry" if Path("/usr/bin/docker-registry").exists() else None
)


@pytest.fixture(scope="module")
def connected(hub_session, tmp_path_factory) -> Connected:
    return build_connected(hub_session, tmp_path_factory)


@pytest.fixture
def registry(tmp_path):
    """A docker-registry serving on 127.0.0.1:<free port> from tmp storage; its host:port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'registry-data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"docker-registry did not start: {proc.stderr.read() if proc.poll() is not None else 'timeout'}"
                )
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_oci_layout_has_the_modelpack_types_and_unbundles(connected, tmp_path):
    layout = tmp_path / "layout"
    r = _cli(["--artifacts", connected.arts, "bundle", "r", "-o", layout, "--format", "oci", "--link"], connected.env)
    assert r.returncode == 0, _show(r)
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs" / "sha256" / digest).read_bytes())
    assert manifest["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    by_path = {lay["annotations"]["org.cncf.model.filepath"]: lay for lay in manifest["layers"]}
    sums = dict(reversed(x.split("  ", 1)) for x in (connected.dir / "SHA256SUMS").read_text().splitlines())
    blob_of = {n: s for n, s in sums.items() if "/blobs/" in n}
    weights = [lay for lay in manifest["layers"] if lay["mediaType"] == "application/vnd.cncf.model.weight.v1.raw"]
    assert weights and all(
        lay["digest"] == "sha256:" + blob_of[lay["annotations"]["org.cncf.model.filepath"]] for lay in weights
    )
    assert by_path["run/resolve.msgpack"]["mediaType"] == "application/vnd.cncf.model.doc.v1.raw"
    assert "SHA256SUMS" in by_path  # the checksum list travels as a layer too
    assert _cli(["verify", layout], connected.env).returncode == 0
    arts, cache = tmp_path / "arts", tmp_path / "cache"
    u = _cli(["--artifacts", arts, "unbundle", layout], connected.offline_env(cache))
    assert u.returncode == 0, _show(u)
    launched = _cli(["--artifacts", arts, "launch", "r", "--json", *PROMPT], connected.offline_env(cache))
    assert json.loads(launched.stdout)["completions"][0]["token_ids"] == connected.tokens
    # a weight blob altered in the layout: refused, nothing placed
    blob = layout / "blobs" / "sha256" / weights[0]["digest"].split(":")[1]
    blob.unlink()  # hard-linked to the cache: replace, never edit in place
    blob.write_bytes(b"\0" * weights[0]["size"])
    bad = _cli(["--artifacts", tmp_path / "arts2", "unbundle", layout], connected.offline_env(tmp_path / "cache2"))
    assert bad.returncode == CODE["integrity"], _show(bad)
    assert not (tmp_path / "arts2" / "r").exists()


@pytest.mark.skipif(
    REGISTRY is None, reason="Debian's docker-registry is not installed: apt-get install -y docker-registry"
)
def test_push_pull_through_a_registry_then_launch(connected, registry, tmp_path):
    ref = f"{registry}/prestage/tiny:v1"
    pushed = _cli(["--artifacts", connected.arts, "push", "r", ref, "--plain-http", "--json"], connected.env)
    assert pushed.returncode == 0, _show(pushed)
    assert json.loads(pushed.stdout)["layers"] > 10
    assert not [p for p in connected.arts.iterdir() if p.name.startswith(".prestage-push-")]
    pulled = tmp_path / "pulled"
    r = _cli(["pull", ref, "-o", pulled, "--plain-http"], connected.env)
    assert r.returncode == 0, _show(r)
    arts, cache = tmp_path / "arts", tmp_path / "cache"
    env = connected.offline_env(cache)
    u = _cli(["--artifacts", arts, "unbundle", pulled], env)
    assert u.returncode == 0, _show(u)
    launched = _cli(["--artifacts", arts, "launch", "r", "--json", *PROMPT], env)
    assert launched.returncode == 0, _show(launched)
    assert json.loads(launched.stdout)["completions"][0]["token_ids"] == connected.tokens
    # unbundle straight from the registry: pulled into a temporary layout, checked, placed, the layout removed
    arts3 = tmp_path / "arts3"
    direct = _cli(["--artifacts", arts3, "--run", "r3", "unbundle", ref, "--plain-http", "--json"], env)
    assert direct.returncode == 0, _show(direct)
    assert sorted(p.name for p in arts3.iterdir()) == ["r3"] and json.loads(direct.stdout)["skipped"]
    d = _cli(["diff", connected.arts / "r", pulled, "--json"], env)
    assert json.loads(d.stdout)["same"] is True, d.stdout
    missing = _cli(["pull", f"{registry}/prestage/none:v1", "-o", tmp_path / "none", "--plain-http"], env)
    assert missing.returncode == CODE["not-found"] and missing.stdout == "", _show(missing)
    assert len(missing.stderr.strip().splitlines()) == 1 and "no such repository or tag" in missing.stderr
    assert not (tmp_path / "none").exists()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    t0 = time.monotonic()
    down = _cli(["push", connected.dir, f"127.0.0.1:{closed}/p/t:v1", "--plain-http"], env)
    assert down.returncode == CODE["usage"] and "--format oci" in down.stderr, _show(down)  # a folder bundle
    down = _cli(["pull", f"127.0.0.1:{closed}/p/t:v1", "-o", tmp_path / "d", "--plain-http"], env)
    assert down.returncode == CODE["network"] and "cannot be reached" in down.stderr, _show(down)
    assert time.monotonic() - t0 < 30  # no minutes of library retries


def test_pull_reads_no_more_than_a_layer_descriptor_says(tmp_path, monkeypatch):
    """A registry that streams endless bytes for a layer: pull stops after the descriptor's size + 1 and fails
    with integrity (it used to write until the disk was full), leaving no partial layout."""
    import hashlib
    import io

    from prestage.runner import oci
    from prestage.stages import errors

    data = b"x" * 1000
    desc = {"mediaType": oci.WEIGHT, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data)}
    config = {"mediaType": oci.CONFIG, "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest(), "size": 2}
    manifest = {"artifactType": oci.ARTIFACT, "config": config, "layers": [desc]}

    class Endless(io.RawIOBase):
        served = 0

        def readable(self):
            return True

        def readinto(self, b):
            if Endless.served > 64 * 1024 * 1024:  # before the fix pull read on forever: stop it here
                raise OSError("pull read 64 MB of a 1000-byte layer")
            b[:] = b"\0" * len(b)
            Endless.served += len(b)
            return len(b)

    class Resp:
        def __init__(self, body):
            self.raw = body

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def raise_for_status(self):
            return None

    class FakeClient:
        def get_container(self, target):
            return target

        def get_manifest(self, container):
            return manifest

        def get_blob(self, container, digest, stream=True):
            return Resp(io.BytesIO(b"{}") if digest == config["digest"] else Endless())

    monkeypatch.setattr(oci, "_client", lambda host, insecure, ref: FakeClient())
    out = tmp_path / "pulled"
    with pytest.raises(errors.IntegrityError, match="other bytes"):
        oci.pull("127.0.0.1:1/x/q:v1", out, True, None)
    assert Endless.served <= len(data) + 1 + 8 * 1024 * 1024
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]
