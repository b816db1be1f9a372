"""Nothing corrupt is ever cached, and a corrupt cached copy is never used.

- A file the hub serves with wrong bytes fails with `integrity` (10) and leaves nothing in the cache; once
  the hub serves good bytes the same command succeeds (config.json, tokenizer files, the weights).
- A cached copy whose bytes went bad (config.json, tokenizer.json, the safetensors index) is checked against
  the listing before use: `integrity`, the copy and its snapshot link are deleted, and the next run
  downloads it again and succeeds.
- A branch that moves under a pinned run changes nothing: later stages download at the pinned commit.
- A manifest whose `outputs.files` is not a list, or whose file entry lacks `size`, is `bad-manifest` (12)
  for verify, a "stale" stage with that reason for status, and `run` recovers by re-running that stage.
"""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from prestage.stages import hub as hubmod
from prestage.stages.errors import CODE
from tests.reliability.conftest import error_lines, stable_manifests

REPO = "test-org/tiny-single"
SHARDED = "test-org/tiny-sharded"


def _blobs(cache: Path, repo: str) -> list[Path]:
    folder = hubmod.repo_folder(cache, repo) / "blobs"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _snapshot(cache: Path, repo: str) -> Path:
    return next((hubmod.repo_folder(cache, repo) / "snapshots").iterdir())


@pytest.mark.parametrize(
    "path,to",
    [("config.json", "resolve"), ("model.safetensors", "fetch-weights")],
)
def test_wrong_bytes_served_once_are_refused_then_a_fixed_hub_works(bad_hub, cli, hf_env, tmp_path, path, to):
    cache = Path(hf_env["HF_HUB_CACHE"])
    bad_hub.wrong_bytes(REPO, path)
    args = ["-q", "--artifacts", tmp_path / "a", "run", REPO, "--to", to]
    rc, _out, err = cli(args, hf_env)
    assert rc == CODE["integrity"], err
    assert len(error_lines(err)) == 1 and path in err
    assert not list((hubmod.repo_folder(cache, REPO) / "snapshots").rglob(path))
    assert not list(cache.rglob("*.incomplete"))
    want = bad_hub.hub.file_entry(REPO, path)
    assert not [b for b in _blobs(cache, REPO) if b.name in (want.sha256, want.blob_id)]
    bad_hub.hub.corrupt(REPO, path, enabled=False)  # the hub is fixed
    rc, _out, err = cli(args, hf_env)
    assert rc == 0, err


@pytest.mark.parametrize(
    "repo,path,to",
    [
        (REPO, "config.json", "resolve"),
        (REPO, "tokenizer.json", "tokenize-prep"),
        (SHARDED, "model.safetensors.index.json", "fetch-weights"),
    ],
)
def test_a_corrupt_cached_copy_is_deleted_and_fetched_again(bad_hub, cli, hf_env, tmp_path, repo, path, to):
    cache = Path(hf_env["HF_HUB_CACHE"])
    args = ["-q", "--artifacts", tmp_path / "a", "--run", "r", "run", repo, "--to", to]
    rc, _out, err = cli(args, hf_env)
    assert rc == 0, err
    reference = stable_manifests(tmp_path / "a" / "r")
    link = _snapshot(cache, repo) / path
    blob = link.resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: same size, other bytes
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    for m in (tmp_path / "a").rglob(f"{to}.msgpack"):
        m.unlink()  # the stage runs again and uses the cached copy
    rc, _out, err = cli(args, hf_env)
    assert rc == CODE["integrity"], err
    assert len(error_lines(err)) == 1 and path in err and "deleted" in err
    assert not link.exists() and not link.is_symlink() and not blob.exists()
    bad_hub.hub.reset_counters()
    rc, _out, err = cli(args, hf_env)
    assert rc == 0, err
    assert bad_hub.hub.downloads.get(f"{repo}/{path}") == 1  # fetched again, once
    assert stable_manifests(tmp_path / "a" / "r") == reference


def test_a_branch_moving_under_a_pinned_run_changes_nothing(bad_hub, cli, hf_env, tmp_path, checkpoint_dirs):
    hub = bad_hub.hub
    base = checkpoint_dirs["single"]
    first = hub.commit("rel/moving", base, replace=True, message="first")
    args = ["-q", "--artifacts", tmp_path / "a", "--run", "m"]
    rc, _out, err = cli([*args, "run", "rel/moving", "--to", "configure"], hf_env)
    assert rc == 0, err
    moved = bad_hub.move_branch("rel/moving", {"model.safetensors": b"not the pinned weights"})
    assert moved != first
    rc, _out, err = cli([*args, "run", "rel/moving", "--to", "fetch-weights"], hf_env)
    assert rc == 0, err
    pinned = stable_manifests(tmp_path / "a" / "m")
    assert pinned["fetch-weights"]["upstream"] and pinned["resolve"]["outputs"]["commit"] == first
    weights = pinned["fetch-weights"]["outputs"]["files"]
    assert [f["sha256"] for f in weights] == [hub.file_entry("rel/moving", "model.safetensors", first).sha256]


def _edit_outputs(path: Path, edit) -> None:
    doc = msgpack.unpackb(path.read_bytes(), raw=False)
    edit(doc["outputs"])
    path.write_bytes(msgpack.packb(doc, use_bin_type=True))


@pytest.mark.parametrize(
    "edit",
    [
        lambda o: o.update(files={"model.safetensors": 1}),
        lambda o: o["files"][0].pop("size"),
    ],
    ids=["files-not-a-list", "file-lacks-size"],
)
def test_a_mistyped_manifest_is_bad_manifest_and_run_recovers(cli, hf_env, tmp_path, checkpoint_dirs, edit):
    import shutil

    model = shutil.copytree(checkpoint_dirs["single"], tmp_path / "model")
    args = ["-q", "--artifacts", tmp_path / "a", "--run", "r"]
    rc, _out, err = cli([*args, "run", model, "--to", "fetch-weights"], hf_env)
    assert rc == 0, err
    reference = stable_manifests(tmp_path / "a" / "r")
    _edit_outputs(tmp_path / "a" / "r" / "fetch-weights.msgpack", edit)
    # status reports every stage, so the bad one is "stale" with the bad-manifest reason (no traceback)
    rc, out, err = cli(["--artifacts", tmp_path / "a", "status", "r"], hf_env)
    assert rc == 0 and "Traceback" not in err
    assert [line for line in out.splitlines() if "fetch-weights" in line and "stale" in line and "'files" in line]
    rc, _out, err = cli(["-q", "--artifacts", tmp_path / "a", "verify", "r"], hf_env)
    assert rc == CODE["bad-manifest"], err
    assert len(error_lines(err)) == 1 and "fetch-weights.msgpack" in err
    rc, _out, err = cli([*args, "run", model, "--to", "fetch-weights"], hf_env)
    assert rc == 0, err
    assert stable_manifests(tmp_path / "a" / "r") == reference


def test_configure_checks_the_cached_config_before_reading_it(cli, hf_env, tmp_path):
    cache = Path(hf_env["HF_HUB_CACHE"])
    args = ["-q", "--artifacts", tmp_path / "a", "--run", "r"]
    rc, _out, err = cli([*args, "resolve", REPO], hf_env)
    assert rc == 0, err
    blob = (_snapshot(cache, REPO) / "config.json").resolve()
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes().replace(b"64", b"65", 1))  # a valid config, other bytes
    rc, _out, err = cli([*args, "configure", "r"], hf_env)
    assert rc == CODE["integrity"], err
    assert len(error_lines(err)) == 1 and "config.json" in err and not blob.exists()
