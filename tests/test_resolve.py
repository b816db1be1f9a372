"""The resolve stage against the local hub and local folders (docs/vllm-rules.md §1, cases R-01..R-10)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from prestage.stages.errors import CODE
from prestage.stages.manifest import read


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _manifest(arts, run="test-org--tiny-single", stage="resolve"):
    return read(arts / run / f"{stage}.msgpack")


def _one_line(r):
    assert "Traceback" not in r.stderr, r.stderr
    errs = [x for x in r.stderr.splitlines() if x.startswith("prestage: error:")]
    assert len(errs) == 1, r.stderr
    return errs[0]


def test_resolve_pins_commit_records_listing_and_caches(hub, hf_env, prestage, tmp_path):
    arts = tmp_path / "arts"
    r = prestage(["--artifacts", str(arts), "run", "test-org/tiny-single", "--to", "resolve"], env=hf_env)
    assert r.rc == 0, r.stderr
    m = _manifest(arts)
    out = m.outputs
    assert out["commit"] == hub.resolve("test-org/tiny-single", "main") and len(out["commit"]) == 40
    assert out["revision"] == "main" and out["config_format"] == "hf" and out["listing"] == "full"
    assert m.volatile["listing_from"] == "hub"
    files = {f["path"]: f for f in out["files"]}
    entry = hub.file_entry("test-org/tiny-single", "model.safetensors")
    assert files["model.safetensors"]["sha256"] == entry.sha256 and files["model.safetensors"]["lfs"] is True
    assert files["model.safetensors"]["size"] == entry.size and "config.json" in files
    assert m.volatile["token"] == "absent" and m.inputs["revision"] == "main"
    assert not {"token", "endpoint", "download_dir"} & set(m.inputs)  # where and how, never what
    assert out["snapshot"] == f"models--test-org--tiny-single/snapshots/{out['commit']}"

    shown = prestage(["--artifacts", str(arts), "inspect", "test-org--tiny-single"], env=hf_env)
    assert shown.rc == 0 and out["commit"] in shown.stdout and "model.safetensors" in shown.stdout

    path = arts / "test-org--tiny-single" / "resolve.msgpack"
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    hub.reset_counters()
    again = prestage(["--artifacts", str(arts), "run", "test-org/tiny-single", "--to", "resolve"], env=hf_env)
    assert again.rc == 0 and "cached" in again.stderr
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    assert sum(hub.requests.values()) == 0  # the cached path asks the hub nothing


def test_other_revision_reruns_and_pins_it(hub, hf_env, prestage, tmp_path):
    arts = tmp_path / "arts"
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    old = hub.commit("test-org/revs", {"config.json": json.dumps(cfg)}, tag="v1")
    new = hub.commit("test-org/revs", {"config.json": json.dumps({**cfg, "vocab_size": 7})})
    assert prestage(["--artifacts", str(arts), "resolve", "test-org/revs"], env=hf_env).rc == 0
    assert _manifest(arts, "test-org--revs").outputs["commit"] == new
    r = prestage(["--artifacts", str(arts), "resolve", "test-org/revs", "--revision", "v1"], env=hf_env)
    assert r.rc == 0 and "running" in r.stderr, r.stderr
    m = _manifest(arts, "test-org--revs")
    assert m.outputs["commit"] == old and m.inputs["revision"] == "v1"
    r = prestage(["--artifacts", str(arts), "resolve", "test-org/revs", "--revision", old], env=hf_env)
    assert r.rc == 0 and _manifest(arts, "test-org--revs").outputs["commit"] == old


def test_cached_resolve_needs_no_hub(hub, hf_env, prestage, tmp_path):
    """With the hub unreachable, a model already in the cache resolves from it (no network call)."""
    arts = tmp_path / "arts"
    assert prestage(["--artifacts", str(arts), "resolve", "test-org/tiny-single"], env=hf_env).rc == 0
    first = _manifest(arts).outputs
    dead = {**hf_env, "HF_ENDPOINT": f"http://127.0.0.1:{_free_port()}"}
    r = prestage(["--artifacts", str(arts / "b"), "--run", "x", "resolve", "test-org/tiny-single"], env=dead)
    assert r.rc == 0, r.stderr
    second = read(arts / "b" / "x" / "resolve.msgpack")
    assert second.outputs == first and second.volatile["listing_from"] == "cache"  # same record, any cache state


def test_R10_offline_with_cache(hub, hf_env, prestage, tmp_path):
    arts = tmp_path / "arts"
    assert prestage(["--artifacts", str(arts), "resolve", "test-org/tiny-single"], env=hf_env).rc == 0
    hub.reset_counters()
    r = prestage(
        ["--artifacts", str(arts / "off"), "resolve", "test-org/tiny-single"], env={**hf_env, "HF_HUB_OFFLINE": "1"}
    )
    assert r.rc == 0, r.stderr
    assert sum(hub.requests.values()) == 0


def test_R09_offline_not_cached(hub, hf_env, prestage, tmp_path):
    r = prestage(["--artifacts", str(tmp_path), "resolve", "test-org/tiny-single", "--offline"], env=hf_env)
    assert r.rc == CODE["offline-miss"]
    line = _one_line(r)
    assert "test-org/tiny-single@main" in line and "offline" in line
    assert sum(hub.requests.values()) >= 0


def test_R09_offline_commit_not_cached_is_offline_miss(hub, hf_env, prestage, tmp_path):
    """A 40-hex --revision offline with an empty cache is an offline miss (5), not 'no config.json' (3)."""
    commit = hub.resolve("test-org/tiny-single")
    r = prestage(
        ["--artifacts", str(tmp_path), "resolve", "test-org/tiny-single", "--revision", commit, "--offline"], env=hf_env
    )
    assert r.rc == CODE["offline-miss"], r.stderr
    line = _one_line(r)
    assert commit in line and "offline" in line


def test_R06_repo_not_found(hub, hf_env, prestage, tmp_path):
    r = prestage(["--artifacts", str(tmp_path), "resolve", "nobody/does-not-exist"], env=hf_env)
    assert r.rc == CODE["not-found"]
    line = _one_line(r)
    assert "nobody/does-not-exist@main" in line and "no token was given" in line


def test_R07_revision_not_found(hub, hf_env, prestage, tmp_path):
    r = prestage(
        ["--artifacts", str(tmp_path), "resolve", "test-org/tiny-single", "--revision", "no-such-branch"], env=hf_env
    )
    assert r.rc == CODE["not-found"]
    line = _one_line(r)
    assert "no-such-branch" in line and "--revision" in line


def test_R08_gated_without_and_with_wrong_token(hub, hf_env, prestage, tmp_path):
    r = prestage(["--artifacts", str(tmp_path), "resolve", "test-org/gated"], env=hf_env)
    assert r.rc == CODE["auth"]
    line = _one_line(r)
    assert "test-org/gated@main" in line and "no token was given" in line
    secret = "hf_wrongwrongwrong"
    r = prestage(["--artifacts", str(tmp_path), "resolve", "test-org/gated"], env={**hf_env, "HF_TOKEN": secret})
    assert r.rc == CODE["auth"]
    line = _one_line(r)
    assert "a token was given via HF_TOKEN" in line and secret not in r.stderr + r.stdout


def test_gated_with_granted_token_records_only_presence(hub, hf_env, prestage, tmp_path):
    hub.allow_token("test-org/gated", "hf_granted_token")
    r = prestage(
        ["--artifacts", str(tmp_path), "resolve", "test-org/gated", "--hf-token", "hf_granted_token"], env=hf_env
    )
    assert r.rc == 0, r.stderr
    raw = (tmp_path / "test-org--gated" / "resolve.msgpack").read_bytes()
    assert b"hf_granted_token" not in raw
    assert read(tmp_path / "test-org--gated" / "resolve.msgpack").volatile["token"] == "present"


def test_repo_without_config(hub, hf_env, prestage, tmp_path):
    r = prestage(["--artifacts", str(tmp_path), "resolve", "test-org/no-config"], env=hf_env)
    assert r.rc == CODE["not-found"]
    assert "no config.json" in _one_line(r)


def test_hub_unreachable_bounded_retries(hf_env, prestage, tmp_path):
    dead = {**hf_env, "HF_ENDPOINT": f"http://127.0.0.1:{_free_port()}"}
    t0 = time.monotonic()
    r = prestage(["--artifacts", str(tmp_path), "resolve", "test-org/tiny-single"], env=dead)
    assert r.rc == CODE["network"]
    assert "unreachable" in _one_line(r)
    assert time.monotonic() - t0 < 20


@pytest.mark.parametrize(
    "case,files,expect",
    [
        ("R-01", {"config.json": "{}"}, ("hf", "config.json")),
        (
            "R-02",
            {"config.json": "{}", "params.json": "{}", "consolidated.safetensors": ""},
            ("mistral", "params.json"),
        ),
        ("R-03", {"config.json": "{}", "consolidated.safetensors": ""}, ("hf", "config.json")),
    ],
)
def test_R01_R03_local_format_detection(case, files, expect, prestage, tmp_path):
    d = tmp_path / case
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text)
    r = prestage(["--artifacts", str(tmp_path / "a"), "resolve", str(d)])
    assert r.rc == 0, r.stderr
    out = read(tmp_path / "a" / case / "resolve.msgpack").outputs
    assert (out["config_format"], out["config_file"]) == expect
    assert out["source"] == "local" and out["commit"] is None and out["revision"] is None


@pytest.mark.parametrize("case,files", [("R-04", {"params.json": "{}"}), ("R-05", {})])
def test_R04_R05_local_without_config(case, files, prestage, tmp_path):
    d = tmp_path / case
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text)
    r = prestage(["--artifacts", str(tmp_path / "a"), "resolve", str(d)])
    assert r.rc == CODE["not-found"]
    assert str(d) in _one_line(r) or case in _one_line(r)


def test_forced_mistral_format_without_params(prestage, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({}))
    r = prestage(["--artifacts", str(tmp_path / "a"), "resolve", str(d), "--config-format", "mistral"])
    assert r.rc == CODE["not-found"] and "params.json" in _one_line(r)


def test_token_reaches_no_manifest_file_or_output_through_the_whole_chain(hub, hf_env, prestage, tmp_path):
    """A granted token drives every stage up to fetch-weights; no file of the run and no line printed holds it."""
    secret = "hf_chain_secret_token_0123"
    hub.allow_token("test-org/gated", secret)
    arts = tmp_path / "arts"
    r = prestage(["-v", "--artifacts", str(arts), "run", "test-org/gated", "--hf-token", secret], env=hf_env)
    assert r.rc == 0, r.stderr
    assert secret not in r.stderr + r.stdout
    files = [p for p in (arts / "test-org--gated").rglob("*") if p.is_file()]
    assert {"resolve.msgpack", "fetch-weights.msgpack", "tokenize-prep.msgpack"} <= {p.name for p in files}
    for p in files:
        assert secret.encode() not in p.read_bytes(), p
    r = prestage(["-v", "--artifacts", str(arts), "inspect", "test-org--gated", "--json"], env=hf_env)
    assert r.rc == 0 and secret not in r.stdout + r.stderr


def test_download_dir_given_to_resolve_is_inherited_by_later_stages(hub, hf_env, prestage, tmp_path):
    """`resolve --download-dir D` then the stages one by one, without the flag: they all use D."""
    arts, cache = tmp_path / "arts", tmp_path / "elsewhere"
    r = prestage(["--artifacts", arts, "resolve", "test-org/tiny-single", "--download-dir", cache], env=hf_env)
    assert r.rc == 0, r.stderr
    for stage in ("configure", "tokenize-prep", "fetch-weights"):
        r = prestage(["--artifacts", arts, stage, "test-org--tiny-single"], env=hf_env)
        assert r.rc == 0, (stage, r.stderr)
    fetched = read(arts / "test-org--tiny-single" / "fetch-weights.msgpack")
    assert "download_dir" not in fetched.inputs  # where, not what: found again through stages/paths.py
    snapshot = cache / fetched.outputs["folder"]
    assert (snapshot / "model.safetensors").is_file()
    assert not (Path(hf_env["HF_HUB_CACHE"]) / fetched.outputs["folder"] / "model.safetensors").exists()
