"""The manifest format: canonical bytes, atomic writes, strict one-line errors on damaged files."""

from __future__ import annotations

import os

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prestage.stages import manifest as mf
from prestage.stages.errors import BadManifestError


def _sample(**over) -> mf.Manifest:
    kw = dict(
        stage="resolve",
        stage_version=1,
        inputs={"model": "org/name", "revision": "main", "token": "absent"},
        upstream={},
        outputs={"commit": "a" * 40, "files": [{"path": "config.json", "size": 10}]},
        warnings=["w"],
        volatile={"started_at": "now", "duration_s": 0.1},
    )
    kw.update(over)
    return mf.Manifest(**kw)


def test_roundtrip_and_digest_ignores_volatile(tmp_path):
    a = _sample()
    b = _sample(volatile={"started_at": "later", "duration_s": 9.9, "host": "other"})
    assert a.digest == b.digest and a.fingerprint == b.fingerprint
    path = tmp_path / "resolve.msgpack"
    mf.write(path, a)
    back = mf.read(path)
    assert back.to_dict() == a.to_dict()


def test_bytes_identical_outside_volatile_for_same_inputs():
    # Same content built in a different key order: the stable part must encode to the same bytes.
    a = _sample(outputs={"z": 1, "a": {"y": 2, "b": 3}})
    b = _sample(outputs={"a": {"b": 3, "y": 2}, "z": 1}, volatile={"other": True})
    assert a.to_bytes() != b.to_bytes()
    assert a.to_bytes().split(b"\xa8volatile")[0] == b.to_bytes().split(b"\xa8volatile")[0]


def test_fingerprint_changes_with_inputs_and_upstream():
    a = _sample()
    assert _sample(inputs={**a.inputs, "revision": "v2"}).fingerprint != a.fingerprint
    assert _sample(upstream={"resolve": "x"}).fingerprint != a.fingerprint
    assert _sample(stage_version=2).fingerprint != a.fingerprint


def test_secrets_are_not_plain_data():
    with pytest.raises(TypeError):
        mf.plain({"token": object()})


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = tmp_path / "run" / "configure.msgpack"
    mf.write(path, _sample(stage="configure"))
    mf.write(path, _sample(stage="configure", outputs={"x": 1}))
    assert sorted(os.listdir(path.parent)) == ["configure.msgpack"]


def test_newer_schema_is_refused(tmp_path):
    doc = _sample().to_dict()
    doc["schema_version"] = mf.SCHEMA_VERSION + 1
    path = tmp_path / "x.msgpack"
    path.write_bytes(msgpack.packb(doc))
    with pytest.raises(BadManifestError, match="newer prestage"):
        mf.read(path)


def test_foreign_msgpack_is_refused(tmp_path):
    path = tmp_path / "x.msgpack"
    path.write_bytes(msgpack.packb({"hello": "world"}))
    with pytest.raises(BadManifestError, match="not a prestage manifest"):
        mf.read(path)


def test_edited_inputs_break_the_fingerprint(tmp_path):
    doc = _sample().to_dict()
    doc["inputs"]["revision"] = "edited"
    path = tmp_path / "x.msgpack"
    path.write_bytes(msgpack.packb(doc))
    with pytest.raises(BadManifestError, match="fingerprint"):
        mf.read(path)


def test_every_truncation_is_a_one_line_error():
    data = _sample().to_bytes()
    for cut in range(len(data)):
        with pytest.raises(BadManifestError) as ei:
            mf.loads(data[:cut], "m.msgpack")
        assert "\n" not in str(ei.value) and str(ei.value).startswith("m.msgpack: ")
    assert mf.loads(data).stage == "resolve"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_are_a_one_line_error(blob):
    try:
        mf.loads(blob, "r.msgpack")
    except BadManifestError as e:
        assert "\n" not in str(e)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_flipped_byte_is_a_one_line_error_or_reads(pos, value):
    data = bytearray(_sample().to_bytes())
    pos %= len(data)
    data[pos] = value
    try:
        m = mf.loads(bytes(data), "f.msgpack")
    except BadManifestError as e:
        assert "\n" not in str(e)
    else:  # what still reads is a well-formed manifest whose fingerprint matches its inputs
        assert m.fingerprint == mf.fingerprint(m.stage, m.stage_version, m.inputs, m.upstream)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_manifest_mode_is_0666_less_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = tmp_path / "run" / "resolve.msgpack"
        mf.write(path, _sample())
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    import subprocess
    import sys
    import time

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    stale = run / f".configure.msgpack.{dead.pid}.abcd_123.tmp"
    other_stale = run / f".resolve.msgpack.{dead.pid}.zz99yy88.tmp"
    live = run / f".configure.msgpack.{os.getppid()}.abcd_123.tmp"  # a live writer's file is kept
    old_style = run / ".configure.msgpack.q1w2e3r4.tmp"  # no pid: removed once older than this process
    new_style = run / ".launch.msgpack.q1w2e3r4.tmp"
    for p in (stale, other_stale, live, old_style, new_style):
        p.write_bytes(b"half a manifest")
    long_ago = time.time() - 3600 * 24
    os.utime(old_style, (long_ago, long_ago))
    unrelated = run / "notes.tmp"
    unrelated.write_text("mine")
    mf.write(run / "configure.msgpack", _sample(stage="configure"))
    left = sorted(p.name for p in run.iterdir())
    assert left == sorted(["configure.msgpack", live.name, new_style.name, unrelated.name])
