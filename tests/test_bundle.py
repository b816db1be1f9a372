"""Air-gapped pre-staging: `prestage bundle`, `unbundle`, `verify BUNDLE` and `diff`, end to end.

The connected side (tests/support/airgap.py) runs resolve -> fetch-weights -> launch against the local hub once
per module; its run is bundled as a folder and as a tar. The air-gapped side has no hub (HF_HUB_OFFLINE=1, a
dead endpoint, the connected cache hidden), a fresh artifacts folder and a fresh empty cache: unbundle, then
launch gives the same greedy tokens and `diff` shows only volatile fields. Tampered bundles are each refused in
one line with the integrity exit code, and nothing is placed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from prestage.stages.errors import CODE
from prestage.stages.manifest import read
from tests.conftest import REPO_ROOT
from tests.support.airgap import PROMPT, REPO, Connected, build_connected, dead_endpoint
from tests.support.airgap import cli as _cli
from tests.support.airgap import show as _show

_dead_endpoint = dead_endpoint


@pytest.fixture(scope="module")
def connected(hub_session, tmp_path_factory) -> Connected:
    return build_connected(hub_session, tmp_path_factory)


@pytest.fixture
def hidden_connected_cache(connected):
    """The connected side's cache moved away for the test (resolve's volatile hint must not find it)."""
    away = connected.cache.with_name("cache-hidden")
    connected.cache.rename(away)
    try:
        yield
    finally:
        away.rename(connected.cache)


def _nothing_placed(arts: Path, cache: Path) -> None:
    assert not arts.exists() or not [p for p in arts.iterdir()], list(arts.iterdir())
    assert not cache.exists() or not [p for p in cache.iterdir()], list(cache.iterdir())


# ---- round trip ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["dir", "tar"])
def test_round_trip_launches_offline_with_the_same_tokens(
    connected, hidden_connected_cache, hub_session, tmp_path, fmt
):
    bundle = connected.dir if fmt == "dir" else connected.tar
    arts, cache = tmp_path / "arts", tmp_path / "fresh-cache"
    env = connected.offline_env(cache)
    hub_session.reset_counters()
    r = _cli(["--artifacts", arts, "unbundle", bundle, "--json"], env)
    assert r.returncode == 0, _show(r)
    report = json.loads(r.stdout)
    assert report["run"] == "r" and report["hub_cache"] == str(cache)
    assert set(report["stages"]) >= {"resolve", "configure", "tokenize-prep", "fetch-weights"}
    assert any(p.endswith("model.safetensors") for p in report["placed"])
    # no manifest rewritten: the placed manifests are the connected side's bytes
    for stage in ("resolve", "configure", "tokenize-prep", "fetch-weights"):
        assert (arts / "r" / f"{stage}.msgpack").read_bytes() == (
            connected.arts / "r" / f"{stage}.msgpack"
        ).read_bytes()
    st = _cli(["--artifacts", arts, "status", "r", "--json"], env)
    assert [s["state"] for s in json.loads(st.stdout)["stages"][:4]] == ["fresh"] * 4, st.stdout
    launched = _cli(["--artifacts", arts, "launch", "r", "--json", *PROMPT], env)
    assert launched.returncode == 0, _show(launched)
    assert json.loads(launched.stdout)["completions"][0]["token_ids"] == connected.tokens
    # `prestage run` on the unbundled side: every stage cached, nothing fetched
    again = _cli(["--artifacts", arts, "--run", "r", "run", REPO, "--json", *PROMPT], env)
    assert [s["status"] for s in json.loads(again.stdout)["stages"]] == ["cached"] * 4 + ["ran"], _show(again)
    assert sum(hub_session.requests.values()) == 0
    # diff of the two runs: nothing outside volatile; with --volatile, the times and hosts differ
    d = _cli(["--artifacts", arts, "diff", connected.arts / "r", arts / "r", "--json"], env)
    assert d.returncode == 0, _show(d)
    assert json.loads(d.stdout)["same"] is True, d.stdout
    dv = json.loads(_cli(["diff", connected.arts / "r", arts / "r", "--volatile", "--json"], env).stdout)
    assert dv["differences"] and all(row["field"].startswith("volatile.") for row in dv["differences"]), dv
    text = _cli(["diff", connected.arts / "r", bundle], env).stdout
    assert text.startswith("same:"), text


def test_bundle_hub_folder_is_a_valid_hf_cache(connected, tmp_path):
    """Plain transformers and huggingface_hub load the model from <bundle>/hub offline; sha256sum -c agrees."""
    code = f"""
import json, sys
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer
snap = snapshot_download({REPO!r}, revision={connected.commit!r}, local_files_only=True)
tok = AutoTokenizer.from_pretrained({REPO!r}, revision={connected.commit!r})
model = AutoModelForCausalLM.from_pretrained({REPO!r}, revision={connected.commit!r})
golden = json.loads(sys.argv[1])
encoded = [tok.encode(g["text"], add_special_tokens=g["add_special_tokens"]) for g in golden]
ids = tok("Hello", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=3, do_sample=False)
print(json.dumps({{"snap": snap, "encoded": encoded, "new": out.shape[1] - ids.shape[1]}}))
"""
    golden = read(connected.arts / "r" / "tokenize-prep.msgpack").to_dict()["outputs"]["golden"]
    env = {
        **connected.env,
        "HF_HUB_CACHE": str(connected.dir / "hub"),
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": _dead_endpoint(),
    }
    p = subprocess.run(
        [sys.executable, "-c", code, json.dumps(golden)], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert Path(got["snap"]) == connected.dir / "hub" / "models--test-org--tiny-single" / "snapshots" / connected.commit
    assert golden and got["encoded"] == [g["ids"] for g in golden]  # the tokenizer encodes as tokenize-prep recorded
    assert got["new"] == 3
    # coreutils reads the checksum list as it is
    check = subprocess.run(
        ["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=connected.dir, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_bundle_reuses_the_recorded_sha256_and_holds_only_what_the_run_needs(connected):
    sums = dict(
        (line.split("  ", 1)[1], line.split("  ", 1)[0])
        for line in (connected.dir / "SHA256SUMS").read_text().splitlines()
    )
    weights = read(connected.arts / "r" / "fetch-weights.msgpack").to_dict()["outputs"]
    snap = f"hub/models--test-org--tiny-single/snapshots/{connected.commit}"
    for f in weights["files"]:
        assert sums[f"{snap}/{f['path']}"] == f["sha256"]
    every = sorted(p.relative_to(connected.dir).as_posix() for p in connected.dir.rglob("*") if not p.is_dir())
    assert every == sorted([*sums, "SHA256SUMS"])  # every file listed, nothing unlisted
    assert {n.split("/", 1)[0] for n in sums} == {"bundle.json", "hub", "run"}
    assert "hub/models--test-org--tiny-single/refs/main" in sums
    assert any(n.startswith("run/tokenizer") for n in sums) and "run/fetch-weights.msgpack" in sums
    link = connected.dir / snap / "model.safetensors"
    assert link.is_symlink() and os.readlink(link).startswith("../../blobs/")
    with tarfile.open(connected.tar) as tar:
        names = tar.getnames()
    assert names[0] == "SHA256SUMS" and sorted(names[1:]) == sorted(sums)


def test_link_hard_links_weights_and_a_taken_output_is_refused(connected, tmp_path):
    out = tmp_path / "linked"
    r = _cli(["--artifacts", connected.arts, "bundle", "r", "-o", out, "--link", "--json"], connected.env)
    assert r.returncode == 0, _show(r)
    assert json.loads(r.stdout)["linked"] >= 1
    blob = (out / "hub/models--test-org--tiny-single/snapshots" / connected.commit / "model.safetensors").resolve()
    src = (
        connected.cache / "models--test-org--tiny-single/snapshots" / connected.commit / "model.safetensors"
    ).resolve()
    assert blob.stat().st_ino == src.stat().st_ino
    again = _cli(["--artifacts", connected.arts, "bundle", "r", "-o", out], connected.env)
    assert again.returncode == CODE["usage"] and "already exists" in again.stderr, _show(again)
    assert len(again.stderr.strip().splitlines()) == 1
    tar_link = _cli(["--artifacts", connected.arts, "bundle", "r", "-o", tmp_path / "x.tar", "--link"], connected.env)
    assert tar_link.returncode == CODE["usage"] and "--link" in tar_link.stderr


def test_unbundle_skips_blobs_the_cache_holds_and_refuses_a_taken_run(connected, tmp_path):
    arts, cache = tmp_path / "arts", tmp_path / "cache"
    env = connected.offline_env(cache)
    assert _cli(["--artifacts", arts, "unbundle", connected.tar], env).returncode == 0
    taken = _cli(["--artifacts", arts, "unbundle", connected.dir], env)
    assert taken.returncode == CODE["usage"] and "--run NEWNAME" in taken.stderr, _show(taken)
    second = _cli(["--artifacts", arts, "--run", "r2", "unbundle", connected.dir, "--json"], env)
    assert second.returncode == 0, _show(second)
    report = json.loads(second.stdout)
    assert any("/blobs/" in n for n in report["skipped"]) and not any("/blobs/" in n for n in report["placed"])
    assert (arts / "r2" / "resolve.msgpack").is_file()
    launched = _cli(["--artifacts", arts, "launch", "r2", "--json", *PROMPT], env)
    assert json.loads(launched.stdout)["completions"][0]["token_ids"] == connected.tokens


def test_verify_bundle_rehashes_every_file(connected, tmp_path):
    for bundle in (connected.dir, connected.tar):
        r = _cli(["verify", bundle, "--json"], connected.env)
        assert r.returncode == 0, _show(r)
        rows = json.loads(r.stdout)["files"]
        assert rows and all(row["ok"] for row in rows)
        assert any(row["path"].endswith("/model.safetensors") for row in rows)
    bad = tmp_path / "bad"
    shutil.copytree(connected.dir, bad, symlinks=True)
    blob = (bad / "hub/models--test-org--tiny-single/snapshots" / connected.commit / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    r = _cli(["verify", bad], connected.env)
    assert r.returncode == CODE["integrity"], _show(r)
    assert any(x.startswith("FAIL") and "/blobs/" in x and "sha256" in x for x in r.stdout.splitlines()), r.stdout
    errors_ = [x for x in r.stderr.splitlines() if x.startswith("prestage: error:")]
    assert len(errors_) == 1 and "fail verification" in errors_[0], r.stderr
    cut = tmp_path / "cut.tar"  # a tar cut inside the weights: the member reads short
    data = connected.tar.read_bytes()
    cut.write_bytes(data[: len(data) * 3 // 4])
    r = _cli(["verify", cut, "--json"], connected.env)
    assert r.returncode == CODE["integrity"], _show(r)
    assert r.stdout == "" and "truncated" in r.stderr and len(r.stderr.strip().splitlines()) == 1, _show(r)


# ---- tampering: one line, the integrity code, nothing placed ------------------------------------------------


def _weight_blob(bundle: Path, commit: str) -> Path:
    return (bundle / "hub/models--test-org--tiny-single/snapshots" / commit / "model.safetensors").resolve()


def _rewrite_sums(bundle: Path) -> None:
    lines = []
    for line in (bundle / "SHA256SUMS").read_text().splitlines():
        sha, name = line.split("  ", 1)
        p = bundle / name
        lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {name}")
    (bundle / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def _tamper(kind: str, c: Connected, tmp: Path) -> Path:
    if kind.startswith("tar-"):
        out = tmp / "t.tar"
        if kind == "tar-truncated":
            data = c.tar.read_bytes()
            out.write_bytes(data[: len(data) * 2 // 3])
        else:  # the bundle's entries plus one hostile entry
            with tarfile.open(c.tar) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
                for m in src.getmembers():
                    dst.addfile(m, src.extractfile(m) if m.isreg() else None)
                if kind == "tar-dotdot":
                    info = tarfile.TarInfo("../../escaped.txt")
                    info.size = 3
                    dst.addfile(info, io.BytesIO(b"bad"))
                elif kind == "tar-symlink-escape":
                    info = tarfile.TarInfo("run/tokenizer/evil")
                    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                    dst.addfile(info)
                elif kind == "tar-device":
                    info = tarfile.TarInfo("run/null")
                    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
                    dst.addfile(info)
        return out
    b = tmp / "b"
    shutil.copytree(c.dir, b, symlinks=True)
    snap = b / "hub/models--test-org--tiny-single/snapshots" / c.commit
    if kind == "flipped-weight-byte":
        blob = _weight_blob(b, c.commit)
        data = bytearray(blob.read_bytes())
        data[-100] ^= 0x40
        blob.write_bytes(bytes(data))
    elif kind == "missing-file":
        next(p for p in (b / "run").rglob("tokenizer.json")).unlink()
    elif kind == "symlink-escape":
        link = snap / "config.json"
        link.unlink()
        link.symlink_to("../../../../../../../../etc/passwd")
    elif kind == "altered-sums":
        text = (b / "SHA256SUMS").read_text().splitlines()
        i = next(n for n, line in enumerate(text) if line.endswith("model.safetensors"))
        sha, name = text[i].split("  ", 1)
        text[i] = f"{'0' * 64}  {name}"
        (b / "SHA256SUMS").write_text("\n".join(text) + "\n")
    elif kind == "sums-with-dotdot":
        with open(b / "SHA256SUMS", "a") as fh:
            fh.write(f"{'0' * 64}  run/../../outside\n")
    elif kind == "unlisted-file":
        (b / "run" / "extra.py").write_text("print('hi')\n")
    elif kind == "fifo":
        os.mkfifo(b / "run" / "pipe")
    elif kind == "edited-manifest":  # configure's max_model_len edited and the checksums redone to match
        import msgpack

        p = b / "run" / "configure.msgpack"
        doc = msgpack.unpackb(p.read_bytes())
        doc["outputs"]["max_model_len"] = 7
        p.write_bytes(msgpack.packb(doc, use_bin_type=True))
        _rewrite_sums(b)
    elif kind == "other-repo-in-cache":  # another model's ref, snapshot and blob planted, checksums redone
        other = b / "hub/models--other-org--victim"
        (other / "refs").mkdir(parents=True)
        (other / "refs/main").write_text("a" * 40)
        (other / "blobs").mkdir()
        (other / "blobs/cafe").write_text('{"architectures": ["Evil"]}')
        (other / "snapshots" / ("a" * 40)).mkdir(parents=True)
        (other / "snapshots" / ("a" * 40) / "config.json").symlink_to("../../blobs/cafe")
        with open(b / "SHA256SUMS", "a") as fh:
            for name in ("refs/main", "blobs/cafe", f"snapshots/{'a' * 40}/config.json"):
                fh.write(
                    f"{hashlib.sha256((other / name).read_bytes()).hexdigest()}  hub/models--other-org--victim/{name}\n"
                )
    elif kind == "edited-config":  # the snapshot's config.json changed and the checksums redone to match
        blob = (snap / "config.json").resolve()
        blob.write_text('{"architectures": ["Evil"]}')
        _rewrite_sums(b)
    return b


TAMPERS = [
    ("flipped-weight-byte", "sha256"),
    ("missing-file", "missing"),
    ("symlink-escape", "escapes"),
    ("altered-sums", "sha256"),
    ("sums-with-dotdot", ".."),
    ("unlisted-file", "not listed"),
    ("fifo", "special file"),
    ("edited-manifest", "configure"),
    ("other-repo-in-cache", "not a file of test-org/tiny-single"),
    ("edited-config", "sha256 resolve recorded"),
    ("tar-truncated", "truncated"),
    ("tar-dotdot", ".."),
    ("tar-symlink-escape", "escapes"),
    ("tar-device", "device file"),
]


@pytest.mark.parametrize("kind,says", TAMPERS, ids=[k for k, _ in TAMPERS])
def test_tampered_bundle_is_refused_and_nothing_is_placed(connected, tmp_path, kind, says):
    bundle = _tamper(kind, connected, tmp_path)
    arts, cache = tmp_path / "arts", tmp_path / "cache"
    r = _cli(["--artifacts", arts, "unbundle", bundle], connected.offline_env(cache))
    assert r.returncode == CODE["integrity"], _show(r)
    lines = [x for x in r.stderr.splitlines() if x.startswith("prestage: error:")]
    assert len(lines) == 1 and says in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    _nothing_placed(arts, cache)
    assert not (tmp_path.parent / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()


def test_unbundle_of_a_path_that_is_no_bundle(connected, tmp_path):
    env = connected.offline_env(tmp_path / "cache")
    r = _cli(["--artifacts", tmp_path / "arts", "unbundle", tmp_path / "nope"], env)
    assert r.returncode == CODE["not-found"] and len(r.stderr.strip().splitlines()) == 1, _show(r)
    (tmp_path / "empty").mkdir()
    r = _cli(["--artifacts", tmp_path / "arts", "unbundle", tmp_path / "empty"], env)
    assert r.returncode == CODE["integrity"] and "SHA256SUMS" in r.stderr, _show(r)


def test_interrupted_unbundle_leaves_nothing_a_launch_could_use(connected, tmp_path):
    """A kill between staging and the final renames: the next unbundle cleans the staging folder and works."""
    arts, cache = tmp_path / "arts", tmp_path / "cache"
    env = connected.offline_env(cache)
    code = f"""
import os, sys
from pathlib import Path
import prestage.runner.unbundle as u
from prestage.stages.base import Reporter
def die(*a, **k):
    os._exit(9)  # as a kill would: no cleanup
u._place = die
u.unbundle(Path({str(connected.tar)!r}), Path({str(arts)!r}), Path({str(cache)!r}), None, None, Reporter())
"""
    p = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True)
    assert p.returncode == 9, p.stderr
    left = [x.name for x in arts.iterdir()]
    assert left and all(n.startswith(".prestage-unbundle-") for n in left), left
    assert not (arts / "r").exists()
    launch = _cli(["--artifacts", arts, "launch", "r", *PROMPT], env)
    assert launch.returncode != 0
    r = _cli(["--artifacts", arts, "unbundle", connected.tar], env)
    assert r.returncode == 0, _show(r)
    assert sorted(x.name for x in arts.iterdir()) == ["r"]  # the dead run's staging folder is gone


@pytest.mark.parametrize("fmt", ["dir", "tar"])
def test_unbundle_syncs_every_staged_byte_before_the_first_rename_and_the_renames_after(
    connected, tmp_path, monkeypatch, fmt
):
    """Durable: one sync of the staging folders' filesystems with every file staged and nothing placed yet,
    then the renames, then one more sync; a crash after the first rename finds whole files."""
    import prestage.runner.unbundle as u
    from prestage.runner import flush
    from prestage.runner.bundle_read import open_bundle
    from prestage.stages.base import Reporter

    arts, cache = tmp_path / "arts", tmp_path / "cache"
    events = []
    real_sync, real_place = flush.sync_filesystems, u._place

    def sync(paths):
        paths = list(paths)
        staged = sum(1 for d in paths for p in Path(d).rglob("*") if p.is_file() and d.name.startswith(".prestage"))
        events.append(("sync", staged, (arts / "r").exists()))
        real_sync(paths)

    def place(*a, **k):
        events.append(("place",))
        return real_place(*a, **k)

    monkeypatch.setattr(flush, "sync_filesystems", sync)
    monkeypatch.setattr(u, "_place", place)
    bundle = connected.dir if fmt == "dir" else connected.tar
    report = u.unbundle(bundle, arts, cache, None, None, Reporter())
    assert [e[0] for e in events] == ["sync", "place", "sync"], events
    b = open_bundle(bundle)
    files = sum(1 for m in b.members() if m.kind == "file")
    b.close()
    assert events[0][1] == files and report["placed"], (events, files)  # every file staged, none renamed yet
    assert events[0][2] is False and (arts / "r").is_dir()


# ---- a local-folder model -------------------------------------------------------------------------------


def test_local_folder_model_bundles_under_model_and_unbundles_where_the_run_records_it(checkpoint_dirs, tmp_path):
    src_root = tmp_path / "src"
    shutil.copytree(checkpoint_dirs["single"], src_root / "ckpt")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE",)}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "unused-cache"), HF_ENDPOINT=dead_endpoint())
    arts = src_root / "arts"
    made = _cli(["--artifacts", arts, "--run", "loc", "run", src_root / "ckpt", "--json", *PROMPT], env)
    assert made.returncode == 0, _show(made)
    tokens = json.loads(made.stdout)["completions"][0]["token_ids"]
    out = tmp_path / "loc.tar"
    r = _cli(["--artifacts", arts, "bundle", "loc", "-o", out], env)
    assert r.returncode == 0, _show(r)
    assert "local-folder model" in r.stderr and "model/" in r.stderr
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert "model/model.safetensors" in names and not any(n.startswith("hub/") for n in names)
    # a local model's bundle places nothing in the cache: one that carries a hub/ file (listed, its sum right)
    # is refused, and nothing is placed
    planted = tmp_path / "planted"
    assert _cli(["--artifacts", arts, "bundle", "loc", "-o", planted], env).returncode == 0
    victim = planted / "hub/models--other-org--victim/refs/main"
    victim.parent.mkdir(parents=True)
    victim.write_text("a" * 40)
    with open(planted / "SHA256SUMS", "a") as fh:
        fh.write(f"{hashlib.sha256(victim.read_bytes()).hexdigest()}  hub/models--other-org--victim/refs/main\n")
    cache = tmp_path / "victim-cache"
    r = _cli(
        ["--artifacts", tmp_path / "planted-arts", "unbundle", planted, "--model-dir", tmp_path / "ckpt"],
        {**env, "HF_HUB_CACHE": str(cache)},
    )
    assert r.returncode == CODE["integrity"] and "local-folder model" in r.stderr, _show(r)
    _nothing_placed(tmp_path / "planted-arts", cache)
    assert not (tmp_path / "ckpt").exists()
    shutil.rmtree(src_root)  # the source machine is gone

    # the run records its model folder as ../../ckpt from the run folder: outside a fresh --artifacts
    dst_arts = tmp_path / "dst" / "arts"
    refused = _cli(["--artifacts", dst_arts, "unbundle", out], env)
    assert refused.returncode == CODE["usage"] and "--model-dir" in refused.stderr, _show(refused)
    assert not dst_arts.exists() or not list(dst_arts.iterdir())
    wrong = _cli(["--artifacts", dst_arts, "unbundle", out, "--model-dir", tmp_path / "elsewhere"], env)
    assert wrong.returncode == CODE["usage"], _show(wrong)
    where = tmp_path / "dst" / "ckpt"
    placed = _cli(["--artifacts", dst_arts, "unbundle", out, "--model-dir", where, "--json"], env)
    assert placed.returncode == 0, _show(placed)
    assert json.loads(placed.stdout)["model_dir"] == str(where) and (where / "model.safetensors").is_file()
    launched = _cli(["--artifacts", dst_arts, "launch", "loc", "--json", *PROMPT], env)
    assert launched.returncode == 0, _show(launched)
    assert json.loads(launched.stdout)["completions"][0]["token_ids"] == tokens


def test_bundle_tar_bytes_are_what_tarfile_writes_with_large_files_page_aligned(tmp_path):
    """write_tar copies file bytes in the kernel, but the tar is byte for byte tarfile's PAX output for the same
    headers; a large file's bytes start on a 4 KiB boundary (a pax comment record pads its header)."""
    from prestage.runner.bundle import Entry, _info, write_tar

    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 77))
    small = tmp_path / "s.json"
    small.write_bytes(b"{}")
    entries = [
        Entry("bundle.json", "a" * 64, 5, data=b"meta\n"),
        Entry("hub/m/blobs/x", "b" * 64, src.stat().st_size, src=src, mtime_ns=1_700_000_000_123_456_789),
        Entry("hub/m/blobs/y", "c" * 64, 2, src=small, mtime_ns=None),
        Entry("hub/m/blobs/z", "d" * 64, src.stat().st_size, src=src, mtime_ns=None),
        Entry("hub/m/snapshots/c/w.bin", "b" * 64, 0, link="../../blobs/x"),
    ]
    write_tar(entries, tmp_path / "ours.tar", sig=b"signature")
    with tarfile.open(tmp_path / "ours.tar") as tar:
        got = {i.name: i for i in tar.getmembers()}
        assert tar.extractfile(got["hub/m/blobs/x"]).read() == src.read_bytes()
        assert tar.extractfile(got["hub/m/blobs/z"]).read() == src.read_bytes()
    assert got["hub/m/blobs/x"].offset_data % 4096 == 0 and got["hub/m/blobs/z"].offset_data % 4096 == 0
    assert "comment" not in got["hub/m/blobs/y"].pax_headers and "comment" not in got["bundle.json"].pax_headers

    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name, size, mtime_ns, data):
            info = _info(name, size, mtime_ns)
            info.pax_headers = dict(got[name].pax_headers)  # the alignment comment, where ours has one
            tar.addfile(info, io.BytesIO(data))

        sums = "".join(f"{e.sha256}  {e.name}\n" for e in entries).encode()
        add("SHA256SUMS", len(sums), None, sums)
        add("SHA256SUMS.sig", 9, None, b"signature")
        add("bundle.json", 5, None, b"meta\n")
        add("hub/m/blobs/x", src.stat().st_size, 1_700_000_000_123_456_789, src.read_bytes())
        add("hub/m/blobs/y", 2, None, b"{}")
        add("hub/m/blobs/z", src.stat().st_size, None, src.read_bytes())
        link = _info("hub/m/snapshots/c/w.bin", 0, None)
        link.type, link.linkname, link.mode = tarfile.SYMTYPE, "../../blobs/x", 0o777
        tar.addfile(link)
    assert (tmp_path / "ours.tar").read_bytes() == ref.getvalue()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial file left


def test_diff_names_each_differing_field():
    from prestage.runner.diff import diff, flatten

    a = {
        "configure": {
            "inputs": {"dtype": "auto"},
            "outputs": {"max_model_len": 32, "files": [{"p": "x", "sha256": "1"}], "ids": [1, 2]},
            "volatile": {"host": "a"},
        }
    }
    b = json.loads(json.dumps(a))
    assert diff(a, b) == [] and diff(a, b, volatile=True) == []
    b["configure"]["outputs"]["max_model_len"] = 16
    b["configure"]["outputs"]["files"][0]["sha256"] = "2"
    b["configure"]["outputs"]["ids"] = [1, 3]
    b["configure"]["volatile"]["host"] = "b"
    fields = [r["field"] for r in diff(a, b)]
    assert fields == ["outputs.files[0].sha256", "outputs.ids", "outputs.max_model_len"]
    assert "volatile.host" in [r["field"] for r in diff(a, b, volatile=True)]
    assert diff(a, {}) == [{"stage": "configure", "field": "(manifest)", "a": "present", "b": "<absent>"}]
    assert flatten({"a": {}, "b": []}) == {"a": {}, "b": []}


def test_diff_of_two_manifest_files_on_the_command_line(connected, tmp_path):
    import msgpack

    from prestage.stages.manifest import Manifest, write

    doc = read(connected.arts / "r" / "configure.msgpack")
    changed = Manifest(
        stage=doc.stage,
        stage_version=doc.stage_version,
        inputs=doc.inputs,
        upstream=doc.upstream,
        outputs={**doc.outputs, "max_model_len": 7},
        warnings=doc.warnings,
        volatile=doc.volatile,
    )
    write(tmp_path / "configure.msgpack", changed)
    assert msgpack.unpackb((tmp_path / "configure.msgpack").read_bytes())["outputs"]["max_model_len"] == 7
    r = _cli(["diff", connected.arts / "r" / "configure.msgpack", tmp_path / "configure.msgpack"], connected.env)
    assert r.returncode == 0, _show(r)
    assert "1 difference(s)" in r.stdout and "configure: outputs.max_model_len: a=" in r.stdout and "b=7" in r.stdout


# ---- signing (OpenSSF model-signing, private-key method) -------------------------------------------------


def _keypair(folder: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = folder / f"{name}.pem", folder / f"{name}.pub"
    priv.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return priv, pub


def test_signed_bundle_verifies_and_unsigned_resigned_or_altered_ones_are_refused(connected, tmp_path):
    priv, pub = _keypair(tmp_path, "ours")
    other_priv, _ = _keypair(tmp_path, "theirs")
    env = connected.env
    signed_dir, signed_tar, resigned = tmp_path / "signed", tmp_path / "signed.tar", tmp_path / "resigned"
    for out, key in ((signed_dir, priv), (signed_tar, priv), (resigned, other_priv)):
        r = _cli(["--artifacts", connected.arts, "bundle", "r", "-o", out, "--sign", key, "--json"], env)
        assert r.returncode == 0 and json.loads(r.stdout)["signed"] is True, _show(r)
    assert (signed_dir / "SHA256SUMS.sig").is_file()
    with tarfile.open(signed_tar) as tar:
        assert tar.getnames()[:2] == ["SHA256SUMS", "SHA256SUMS.sig"]

    for bundle in (signed_dir, signed_tar):
        v = _cli(["verify", bundle, "--verify-key", pub], env)
        assert v.returncode == 0, _show(v)
        arts, cache = tmp_path / f"arts-{bundle.name}", tmp_path / f"cache-{bundle.name}"
        u = _cli(["--artifacts", arts, "unbundle", bundle, "--verify-key", pub], connected.offline_env(cache))
        assert u.returncode == 0 and "signature of SHA256SUMS verifies" in u.stderr, _show(u)

    altered = tmp_path / "altered"
    shutil.copytree(signed_dir, altered, symlinks=True)
    (altered / "run" / "extra").write_text("x")
    with open(altered / "SHA256SUMS", "a") as fh:  # listed, so only the signature can catch it
        fh.write(f"{hashlib.sha256(b'x').hexdigest()}  run/extra\n")
    cases = [
        (connected.dir, "not signed"),
        (resigned, "another key"),
        (altered, "SHA256SUMS was altered"),
    ]
    for bundle, says in cases:
        arts, cache = tmp_path / "arts-bad", tmp_path / "cache-bad"
        r = _cli(["--artifacts", arts, "unbundle", bundle, "--verify-key", pub], connected.offline_env(cache))
        lines = [x for x in r.stderr.splitlines() if x.startswith("prestage: error:")]
        assert r.returncode == CODE["integrity"] and len(lines) == 1 and says in lines[0], (says, _show(r))
        _nothing_placed(arts, cache)
        v = _cli(["verify", bundle, "--verify-key", pub], env)
        assert v.returncode == CODE["integrity"] and says in v.stderr, (says, _show(v))
    # without a key the altered bundle is self-consistent: the signature is what catches it
    assert _cli(["verify", altered], env).returncode == 0
    nokey = _cli(
        ["--artifacts", connected.arts, "bundle", "r", "-o", tmp_path / "n", "--sign", tmp_path / "none.pem"], env
    )
    assert nokey.returncode == CODE["not-found"] and "--sign" in nokey.stderr, _show(nokey)


def test_a_run_not_fresh_up_to_fetch_weights_is_not_bundled_and_hub_cache_picks_the_cache(connected, tmp_path):
    arts = tmp_path / "arts"
    shutil.copytree(connected.arts, arts)
    (arts / "r" / "fetch-weights.msgpack").unlink()
    r = _cli(["--artifacts", arts, "bundle", "r", "-o", tmp_path / "b"], connected.env)
    assert r.returncode == CODE["stale-upstream"] and "fetch-weights" in r.stderr, _show(r)
    assert not (tmp_path / "b").exists()
    # --hub-cache wins over HF_HUB_CACHE for where the model files go
    chosen, env_cache = tmp_path / "chosen", tmp_path / "env-cache"
    u = _cli(
        ["--artifacts", tmp_path / "arts2", "unbundle", connected.dir, "--hub-cache", chosen],
        connected.offline_env(env_cache),
    )
    assert u.returncode == 0, _show(u)
    assert (chosen / "models--test-org--tiny-single" / "snapshots" / connected.commit / "config.json").is_file()
    assert not list(env_cache.iterdir())
