"""The checks on names from outside (stages/names.py, stages/paths.py inside(), the cache's refs/ and blobs/),
in-process: every hostile form is refused with its class before it touches a path, every legitimate one
passes unchanged.
"""

from __future__ import annotations

import os

import pytest

from prestage.stages import errors, hub, model_json, names, paths
from prestage.stages.fetch_weights import selection

HOSTILE_ETAGS = ["../../../../tmp/x", "", "abc", "A" * 64, "0" * 63, "0" * 41, "0" * 64 + "/x", None, 5]
HOSTILE_REVISIONS = [
    "/tmp/pwned",
    "../x",
    "a/../b",
    "a\\b",
    "ma\x01in",
    "ma\nin",
    "a b",
    "a..b",
    "x.lock",
    ".hidden",
    "a//b",
    "a/",
    "a.",
    "@",
    "a@{1}",
    "a:b",
    "a~1",
    "a^",
    "a?",
    "a*",
    "a[",
    "r" * 300,
    "",
]
GOOD_REVISIONS = ["main", "v1.0", "refs/pr/1", "release/2024-01", "0" * 40, "feature_x-y"]
HOSTILE_PATHS = ["../x", "/abs", "a/../../b", "a\\b", "", "a//b", "./a", "a/.", "a\x00b", "C:x", "x" * 300, None]
GOOD_PATHS = ["config.json", "sub/dir/model.safetensors", "tokenizer.model.v3", "a..b.json", ".gitattributes"]


@pytest.mark.parametrize("value", HOSTILE_ETAGS, ids=repr)
def test_a_hostile_etag_is_integrity(value):
    with pytest.raises(errors.IntegrityError) as e:
        names.etag(value, "r@c (f)")
    assert "\n" not in str(e.value) and e.value.exit_code == 10


@pytest.mark.parametrize("value", ["0" * 64, "a" * 40])
def test_a_digest_etag_passes(value):
    assert names.etag(value, "w") == value


@pytest.mark.parametrize("value", HOSTILE_REVISIONS, ids=repr)
def test_a_hostile_revision_is_usage_and_writes_no_ref(value, tmp_path):
    with pytest.raises(errors.UsageError) as e:
        names.revision(value)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    with pytest.raises(errors.UsageError):
        hub.write_ref(tmp_path / "cache", "org/m", value, "0" * 40)
    assert not (tmp_path / "cache").exists() or not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


@pytest.mark.parametrize("value", GOOD_REVISIONS)
def test_a_git_revision_passes_and_its_ref_stays_in_refs(value, tmp_path):
    hub.write_ref(tmp_path, "org/m", value, "1" * 40)
    assert hub.read_ref(tmp_path, "org/m", value) == ("1" * 40 if len(value) != 40 else value)
    for p in tmp_path.rglob("*"):
        assert p.resolve().is_relative_to((tmp_path / "models--org--m" / "refs").resolve()) or p.is_dir()


@pytest.mark.parametrize("value", HOSTILE_PATHS, ids=repr)
def test_a_hostile_repo_path_is_refused(value):
    with pytest.raises(errors.IntegrityError):
        names.repo_path(value, "listing")
    with pytest.raises(errors.InvalidModelError):
        names.repo_path(value, "index", errors.InvalidModelError)


@pytest.mark.parametrize("value", GOOD_PATHS)
def test_a_repo_path_passes(value):
    assert names.repo_path(value, "listing") == value


def test_inside_refuses_a_symlink_out_of_its_root_when_asked(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tmp_path, root / "up")
    assert paths.inside(root, "up/x", "w") == root / "up" / "x"  # by name only: inside
    with pytest.raises(errors.UsageError, match="not inside"):
        paths.inside(root, "up/x", "w", error=errors.UsageError, follow_links=True)
    for bad in ("../x", "/x", "", "a\\b"):
        with pytest.raises(errors.BadManifestError):
            paths.inside(root, bad, "w")


def test_an_index_naming_a_shard_outside_the_repo_is_invalid_model():
    listing = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    for bad in ("../../x.safetensors", "/etc/passwd", 7, {"a": 1}):
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": bad}}
        with pytest.raises(errors.InvalidModelError):
            selection.select("auto", listing, index=index, model="m")


@pytest.mark.parametrize(
    "text",
    ['{"a": ' + "[" * 10_000 + "]" * 10_000 + "}", '{"a": ' + "[" * 70 + "]" * 70 + "}", '{"h": ' + str(10**30) + "}"],
    ids=["10000-deep", "70-deep", "int-beyond-64-bits"],
)
def test_model_json_refuses_deep_or_huge_values_as_invalid_model(text):
    with pytest.raises(errors.InvalidModelError) as e:
        model_json.loads(text, "config.json")
    assert "\n" not in str(e.value)


def test_model_json_passes_a_real_config():
    value = model_json.loads(
        '{"hidden_size": 64, "rope_scaling": {"factor": 2.0}, "ids": [1, 2, 18446744073709551615]}', "c"
    )
    assert value["ids"][-1] == 2**64 - 1


@pytest.mark.parametrize("value", ["t" * 10_000, "org/" + "t" * 10_000, "org/a--b"])
def test_a_tokenizer_id_too_long_or_malformed_is_not_found(value):
    from types import SimpleNamespace

    from prestage.stages.tokenize_prep.source import normalize_tokenizer_arg

    with pytest.raises(errors.NotFoundError) as e:
        normalize_tokenizer_arg(value, SimpleNamespace(model="m", repo_id=None))
    assert len(str(e.value)) < 300
