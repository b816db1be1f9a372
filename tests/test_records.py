"""Typed stage records: strict reading, and each record's shape pinned to its stage's version.

A consumer reads `manifest.record` (stages/records.py), never raw keys, so a manifest whose outputs miss a
field or hold the wrong type is refused in one line (bad-manifest, exit 12) instead of becoming a wrong
value downstream.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from prestage.stages import errors, get_stage
from prestage.stages.manifest import manifest_path, read, write
from prestage.stages.records import RECORDS, ConfigureRecord, GenerationDefaults, ResolveRecord, TokenizerRecord

# stage -> (stage version, record shape). When a record changes, bump the stage's `version` (older manifests
# then read as stale and re-run) and put both new values here: this test fails until both are done.
PINNED = {
    "resolve": (3, "e254b9790ec9304f"),
    "configure": (3, "0ea94900ae42e998"),
    "tokenize-prep": (3, "ab50f1c4b11f394e"),
    "fetch-weights": (2, "c6110407af896bd2"),
    "launch": (3, "c97c8aa9a0e94f02"),
}


@pytest.mark.parametrize("stage", sorted(RECORDS))
def test_record_shape_is_pinned_to_the_stage_version(stage):
    version, shape = PINNED[stage]
    current_version, current_shape = get_stage(stage).version, RECORDS[stage].shape()
    if current_shape != shape:
        assert current_version != version, (
            f"{stage}'s record changed (shape {current_shape}) but its stage version is still {version}: bump "
            f"`version` in its stage.py so older manifests re-run, then pin the new pair in PINNED"
        )
        pytest.fail(f"{stage}: pin the new pair in PINNED: ({current_version}, {current_shape!r})")
    assert current_version == version, f"{stage}: version {current_version} without a record change; update PINNED"


def test_shape_sees_nested_field_changes():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Changed(GenerationDefaults):
        seed: int | None = None

    assert Changed.shape() != GenerationDefaults.shape()
    assert TokenizerRecord.shape() == TokenizerRecord.shape()


RESOLVE = {
    "source": "hub",
    "model": "org/m",
    "repo_id": "org/m",
    "revision": "main",
    "commit": "a" * 40,
    "local_dir": None,
    "snapshot": "models--org--m/snapshots/" + "a" * 40,
    "config_format": "hf",
    "config_file": "config.json",
    "config_sha256": "b" * 64,
    "listing": "full",
    "files": [{"path": "config.json", "size": 10, "sha256": None, "lfs": False, "blob_id": None}],
}


def test_round_trip_and_strict_reading():
    rec = ResolveRecord.from_dict(RESOLVE, "m.msgpack")
    assert rec.to_dict() == RESOLVE and rec.files[0].size == 10
    cases = [
        ({k: v for k, v in RESOLVE.items() if k != "commit"}, "'commit' is missing"),
        ({**RESOLVE, "commit": 7}, "'commit' is int, expected str"),
        (
            {**RESOLVE, "files": [{"path": "x", "size": "10", "sha256": None, "lfs": False, "blob_id": None}]},
            r"'files\[0\].size'",
        ),
        ({**RESOLVE, "files": {"x": 1}}, "'files' is dict, expected a list"),
        ({**RESOLVE, "extra": 1}, "'extra' is not a field"),
        ({**RESOLVE, "files": [{"path": "x", "size": True, "sha256": None, "lfs": False, "blob_id": None}]}, "is bool"),
        # values later stages hand to the hub client and cache paths: an edited one must not steer them
        ({**RESOLVE, "repo_id": "../../x"}, "'repo_id' is '../../x', not a Hugging Face repo id"),
        ({**RESOLVE, "commit": "../../../../x"}, "'commit' is '../../../../x', not a 40-hex commit"),
    ]
    for data, match in cases:
        with pytest.raises(errors.BadManifestError, match=match) as e:
            ResolveRecord.from_dict(data, "m.msgpack")
        assert "\n" not in str(e.value) and str(e.value).startswith("m.msgpack: ") and e.value.exit_code == 12


def test_a_float_field_takes_an_int_but_not_a_bool():
    assert GenerationDefaults.from_dict({**GenerationDefaults().to_dict(), "temperature": 1}).temperature == 1
    with pytest.raises(errors.BadManifestError, match="temperature"):
        GenerationDefaults.from_dict({**GenerationDefaults().to_dict(), "temperature": True})


@pytest.fixture
def model_copy(checkpoint_dirs, tmp_path):
    return shutil.copytree(checkpoint_dirs["single"], tmp_path / "model")


def _edit(path, change):
    m = read(path)
    change(m.outputs)
    write(path, m)  # outputs are not in the fingerprint: the file still reads as a manifest


def test_cli_refuses_a_missing_or_mistyped_output_field_in_one_line(model_copy, tmp_path, prestage):
    arts = tmp_path / "arts"
    assert prestage(["--artifacts", arts, "--run", "r", "run", model_copy, "--to", "configure"]).rc == 0
    run = arts / "r"
    _edit(manifest_path(run, "resolve"), lambda o: o.pop("config_file"))
    r = prestage(["--artifacts", arts, "configure", "r"])
    assert r.rc == 12, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "resolve.msgpack" in lines[0] and "'config_file' is missing" in lines[0], r.stderr
    st = prestage(["--artifacts", arts, "status", "r"])
    assert "stale" in st.stdout + st.stderr and "config_file" in st.stdout + st.stderr

    assert prestage(["--artifacts", arts, "--run", "r", "run", model_copy, "--to", "configure", "--force"]).rc == 0
    _edit(manifest_path(run, "configure"), lambda o: o.update(max_model_len="4096"))
    r = prestage(["--artifacts", arts, "fetch-weights", "r"])
    assert r.rc == 12 and "'max_model_len' is str, expected int" in r.stderr, r
    assert len(r.stderr.strip().splitlines()) == 1


def test_an_older_record_is_stale_by_version(model_copy, tmp_path, prestage):
    """A manifest written by an older stage version (another record shape) is re-run, not misread."""
    arts = tmp_path / "arts"
    assert prestage(["--artifacts", arts, "--run", "r", "run", model_copy, "--to", "configure"]).rc == 0
    path = manifest_path(arts / "r", "configure")
    m = read(path)
    old = dataclasses.replace(m, stage_version=1, fingerprint="", record=None)
    write(path, old)
    st = prestage(["--artifacts", arts, "status", "r", "--json"])
    assert "v1 -> v3" in st.stdout, st
    r = prestage(["--artifacts", arts, "--run", "r", "run", model_copy, "--to", "configure"])
    assert r.rc == 0 and "configure: running" in r.stderr, r
    assert ConfigureRecord.from_dict(read(path).outputs).max_model_len > 0
