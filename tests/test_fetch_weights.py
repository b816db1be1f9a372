"""The fetch-weights stage end to end (docs/vllm-rules.md, W-01..W-19): hub repos on the local test hub, local folders,
integrity, offline, resume after SIGKILL, concurrent fetches, and `prestage verify`.

Most cases run the stages in-process (prestage.runner.chain.run_stage, transformers imported once), the cases
about exit codes run the CLI in-process too (tests.support.cli.run_cli); those about killed and concurrent
processes run the real CLI in subprocesses.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from prestage.runner.chain import run_stage
from prestage.stages import ORDER, errors, get_stage
from prestage.stages import hub as hubmod
from prestage.stages.base import Reporter
from prestage.stages.fetch_weights import download as dl
from prestage.stages.manifest import manifest_path, read
from tests.support.cli import popen_cli, run_cli

QUIET = Reporter(quiet=True)


def defaults(**over) -> dict:
    """CLI parameters as click would give them: every declared option at its default, then `over`."""
    params = {}
    for opt in [*hubmod.OPTIONS, *(o for n in ORDER[:4] for o in get_stage(n).options)]:
        params.setdefault(opt.dest, opt.kwargs.get("default", False if opt.kwargs.get("is_flag") else None))
    params.update(over)
    return params


def prepare(run_dir: Path, model: str, **params):
    """resolve + configure in-process."""
    p = defaults(model=str(model), **params)
    run_stage("resolve", run_dir, p, QUIET)
    run_stage("configure", run_dir, p, QUIET)
    return p


def fetch(run_dir: Path, model: str, force=False, **params):
    p = prepare(run_dir, model, **params)
    return run_stage("fetch-weights", run_dir, p, QUIET, force=force)


def cli(args, env):
    """The CLI in-process with `env` as the whole environment (tests.support.cli)."""
    return run_cli(args, env=env)


def weight_bytes_served(hub, repo) -> dict:
    return {
        k.split("/", 2)[2]: v
        for k, v in hub.bytes_served.items()
        if k.startswith(repo + "/") and k.endswith((".safetensors", ".bin", ".pt", ".pth"))
    }


def copy_variant(src: Path, dst: Path, drop=(), add=None, config=None) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    for name, source in (add or {}).items():
        shutil.copy(source, dst / name)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def error_line(r) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("prestage: error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


# ---- hub repos ------------------------------------------------------------------------------------------


def test_W01_hub_safetensors_and_bin_downloads_only_safetensors(hub, hf_env, checkpoint_dirs, tmp_path):
    repo = "fw/w01"
    hub.commit(
        repo,
        {
            **{p.name: p for p in checkpoint_dirs["single"].iterdir()},
            "pytorch_model.bin": checkpoint_dirs["bin"] / "pytorch_model.bin",
        },
    )
    out = fetch(tmp_path / "run", repo).manifest.outputs
    assert out["format"] == "safetensors" and [f["path"] for f in out["files"]] == ["model.safetensors"]
    assert set(weight_bytes_served(hub, repo)) == {"model.safetensors"}
    entry = hub.file_entry(repo, "model.safetensors")
    assert out["files"][0] == {
        "path": "model.safetensors",
        "size": entry.size,
        "sha256": entry.sha256,
        "kind": "safetensors",
    }
    assert out["root"] == "cache" and out["folder"] == hubmod.snapshot_rel(repo, hub.resolve(repo))
    assert out["tensors"]["model.layers.1.mlp.down_proj.weight"] == {
        "file": "model.safetensors",
        "dtype": "F32",
        "shape": [64, 128],
    }
    assert out["total_bytes"] == entry.size and out["param_count"] > 0


def _w03_repo(hub, checkpoint_dirs, repo):
    files = {p.name: p for p in checkpoint_dirs["sharded"].iterdir()}
    files["consolidated.safetensors"] = checkpoint_dirs["single"] / "model.safetensors"
    hub.commit(repo, files)
    return sorted(n for n in files if n.startswith("model-"))


def test_W03_hub_hf_format_downloads_only_indexed_shards(hub, hf_env, checkpoint_dirs, tmp_path):
    shards = _w03_repo(hub, checkpoint_dirs, "fw/w03")
    out = fetch(tmp_path / "run", "fw/w03", load_format="hf").manifest.outputs
    assert out["format"] == "safetensors" and [f["path"] for f in out["files"]] == shards
    assert out["index"]["path"] == "model.safetensors.index.json"
    assert out["skipped"] == [{"path": "consolidated.safetensors", "why": "not in model.safetensors.index.json"}]
    assert set(weight_bytes_served(hub, "fw/w03")) == set(shards)


def test_W04_hub_auto_picks_mistral_consolidated(hub, hf_env, checkpoint_dirs, tmp_path):
    _w03_repo(hub, checkpoint_dirs, "fw/w04")
    out = fetch(tmp_path / "run", "fw/w04", load_format="AUTO").manifest.outputs
    assert out["load_format"] == "auto" and out["format"] == "mistral"
    assert [f["path"] for f in out["files"]] == ["consolidated.safetensors"]
    assert set(weight_bytes_served(hub, "fw/w04")) == {"consolidated.safetensors"}


def test_W08_hub_bin_leaves_training_files_behind(hub, hf_env, checkpoint_dirs, tmp_path):
    repo = "fw/w08"
    hub.commit(
        repo,
        {
            **{p.name: p for p in checkpoint_dirs["bin"].iterdir()},
            "training_args.bin": b"\x00" * 20000,
            "optimizer.pt": b"\x01" * 20000,
        },
    )
    out = fetch(tmp_path / "run", repo).manifest.outputs
    assert out["format"] == "pt" and [f["path"] for f in out["files"]] == ["pytorch_model.bin"]
    assert out["files"][0]["kind"] == "bin"
    assert out["skipped"] == [{"path": "training_args.bin", "why": "not needed for inference"}]
    # prestage fetches only what loads (vLLM would also download training_args.bin and drop it)
    assert set(weight_bytes_served(hub, repo)) == {"pytorch_model.bin"}
    assert out["tensors"]["model.embed_tokens.weight"]["shape"] == [1024, 64]


def test_W12_hub_original_folder_never_fetched(hub, hf_env, checkpoint_dirs, tmp_path):
    repo = "fw/w12"
    hub.commit(
        repo,
        {
            **{p.name: p for p in checkpoint_dirs["single"].iterdir()},
            "original/consolidated.00.pth": b"\x02" * 30000,
            "original/params.json": "{}",
        },
    )
    out = fetch(tmp_path / "run", repo).manifest.outputs
    assert [f["path"] for f in out["files"]] == ["model.safetensors"]
    assert set(weight_bytes_served(hub, repo)) == {"model.safetensors"}
    assert not any("original/" in k for k in hub.bytes_served)


def test_W13_dummy_reads_no_weights_and_records_shapes(hub, hf_env, tmp_path):
    real = fetch(tmp_path / "real", "test-org/tiny-single").manifest.outputs
    hub.reset_counters()
    out = fetch(tmp_path / "dummy", "test-org/tiny-sharded", load_format="dummy").manifest.outputs
    assert out["format"] == "dummy" and out["files"] == [] and out["total_bytes"] == 0
    assert weight_bytes_served(hub, "test-org/tiny-sharded") == {}
    assert {n: t["shape"] for n, t in out["tensors"].items()} == {n: t["shape"] for n, t in real["tensors"].items()}
    assert out["param_count"] == real["param_count"]


def test_W14_npcache_converts_once_into_the_run_folder(hub, hf_env, tmp_path):
    import numpy as np
    import torch

    run = tmp_path / "run"
    out = fetch(run, "test-org/tiny-bin", load_format="npcache").manifest.outputs
    assert out["format"] == "npcache" and out["npcache"]["dir"] == "np"
    names = run / "np" / "weight_names.json"
    doc = json.loads(names.read_text())
    assert set(doc["names"]) == set(out["tensors"])
    snap = Path(hf_env["HF_HUB_CACHE"]) / out["folder"]
    assert not (snap / "np").exists()  # the HF snapshot stays what the hub served
    state = torch.load(snap / "pytorch_model.bin", weights_only=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert np.array_equal(np.load(run / "np" / doc["tensors"][name]["file"]), state[name].numpy())
    mtime = names.stat().st_mtime_ns
    again = run_stage(
        "fetch-weights", run, defaults(model="test-org/tiny-bin", load_format="npcache"), QUIET, force=True
    )
    assert names.stat().st_mtime_ns == mtime and again.manifest.outputs["npcache"] == out["npcache"]


def test_cached_rerun_and_missing_blob_refetch(hub, hf_env, tmp_path):
    run = tmp_path / "run"
    first = fetch(run, "test-org/tiny-sharded")
    assert first.status == "ran"
    hub.reset_counters()
    assert fetch(run, "test-org/tiny-sharded").status == "cached"
    assert sum(hub.requests.values()) == 0
    snap = Path(hf_env["HF_HUB_CACHE"]) / first.manifest.outputs["folder"]
    victim = first.manifest.outputs["files"][1]["path"]
    dl.remove_cached(snap, victim)
    again = fetch(run, "test-org/tiny-sharded")
    assert again.status == "ran" and set(weight_bytes_served(hub, "test-org/tiny-sharded")) == {victim}


def test_disk_space_checked_before_download(hub, hf_env, tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "_free_bytes", lambda path: 1000)
    with pytest.raises(
        errors.ResourceError, match=r"need 8\d\d kB \(8\d{5} bytes\) more .* only 1.00 kB \(1000 bytes\) is free"
    ):
        fetch(tmp_path / "run", "test-org/tiny-single")
    assert weight_bytes_served(hub, "test-org/tiny-single") == {}


def test_spec_mismatch_fails_before_launch(hub, hf_env, checkpoint_dirs, tmp_path):
    repo = "fw/layers"
    hub.commit(
        repo,
        copy_variant(
            checkpoint_dirs["single"],
            tmp_path / "v",
            config={"num_hidden_layers": 3, "layer_types": ["full_attention"] * 3},
        ),
    )
    with pytest.raises(errors.InvalidModelError, match=r"num_hidden_layers is 3 .* layers 0\.\.1 \(layers 2 missing"):
        fetch(tmp_path / "run", repo)


# ---- local folders --------------------------------------------------------------------------------------


def _local(tmp_path, run="run", **params):
    return lambda folder: fetch(tmp_path / run, folder, **params).manifest.outputs


def test_W02_local_safetensors_and_bin(tmp_path, checkpoint_dirs):
    folder = copy_variant(
        checkpoint_dirs["single"],
        tmp_path / "m",
        add={"pytorch_model.bin": checkpoint_dirs["bin"] / "pytorch_model.bin"},
    )
    out = _local(tmp_path)(folder)
    assert out["root"] == "local" and [f["path"] for f in out["files"]] == ["model.safetensors"]
    assert (tmp_path / "run" / out["folder"]).resolve() == folder.resolve()


def test_W05_local_safetensors_format_drops_consolidated(tmp_path, checkpoint_dirs):
    folder = copy_variant(
        checkpoint_dirs["sharded"],
        tmp_path / "m",
        add={"consolidated.safetensors": checkpoint_dirs["single"] / "model.safetensors"},
    )
    out = _local(tmp_path, load_format="safetensors")(folder)
    assert [f["path"] for f in out["files"]] == sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert out["skipped"][0]["path"] == "consolidated.safetensors"


def test_W06_local_index_names_missing_shard(tmp_path, checkpoint_dirs):
    folder = copy_variant(checkpoint_dirs["sharded"], tmp_path / "m")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra.weight"] = "model-00009-of-00009.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        errors.InvalidModelError,
        match="referenced in model.safetensors.index.json but missing: model-00009-of-00009.safetensors",
    ):
        _local(tmp_path)(folder)


def test_W07_local_shards_without_index_natural_order(tmp_path, checkpoint_dirs):
    folder = copy_variant(checkpoint_dirs["sharded"], tmp_path / "m", drop=["model.safetensors.index.json"])
    for i, p in zip((1, 2, 10), sorted(folder.glob("model-*.safetensors")), strict=True):
        p.rename(folder / f"model-{i}.safetensors")
    out = _local(tmp_path)(folder)
    assert [f["path"] for f in out["files"]] == ["model-1.safetensors", "model-2.safetensors", "model-10.safetensors"]
    assert {t["file"] for t in out["tensors"].values()} == {f["path"] for f in out["files"]}


@pytest.mark.parametrize(
    "case,layout,fmt", [("W-09", "bin", "pt"), ("W-10", "bin", "safetensors"), ("W-11", "single", "auto")]
)
def test_W09_W10_W11_local_no_weights_for_format(tmp_path, checkpoint_dirs, case, layout, fmt):
    folder = copy_variant(checkpoint_dirs[layout], tmp_path / "m")
    if case == "W-11":
        (folder / "model.safetensors").rename(folder / "model.pth")
    with pytest.raises(errors.UnsupportedError, match=f"Cannot find any model weights with load format '{fmt}'"):
        _local(tmp_path, load_format=fmt)(folder)


def test_local_embed_shape_checked_against_config(tmp_path, checkpoint_dirs):
    folder = copy_variant(checkpoint_dirs["single"], tmp_path / "m", config={"vocab_size": 2048})
    with pytest.raises(errors.InvalidModelError, match=r"embed_tokens.weight has shape \[1024, 64\]"):
        _local(tmp_path)(folder)


def test_local_zero_tensor_shard_is_invalid_model(tmp_path, checkpoint_dirs):
    """A safetensors file holding no tensor (only metadata) is refused, naming the file."""
    from safetensors.torch import save_file

    folder = copy_variant(checkpoint_dirs["single"], tmp_path / "m")
    save_file({}, str(folder / "model-extra.safetensors"), metadata={"format": "pt"})
    with pytest.raises(errors.InvalidModelError, match=r"model-extra.safetensors: holds no tensors"):
        _local(tmp_path)(folder)


def test_local_changed_file_is_an_integrity_error(tmp_path, checkpoint_dirs):
    folder = copy_variant(checkpoint_dirs["single"], tmp_path / "m")
    p = prepare(tmp_path / "run", folder)
    with open(folder / "model.safetensors", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(errors.IntegrityError, match="model.safetensors: has .* bytes, resolve listed"):
        run_stage("fetch-weights", tmp_path / "run", p, QUIET)
    assert (folder / "model.safetensors").exists()  # never delete a user's local files


# ---- the CLI: exit codes, offline, corruption, processes ------------------------------------------------


def test_W19_unknown_load_format_is_usage_error(hub, hf_env, tmp_path):
    arts = tmp_path / "arts"
    prepare(arts / "m", "test-org/tiny-single")
    r = cli(["--artifacts", arts, "fetch-weights", "m", "--load-format", "foo"], hf_env)
    assert r.returncode == errors.CODE["usage"], r.stderr
    assert "--load-format 'foo': not a load format; use one of auto, hf, safetensors" in error_line(r)


def test_W18_offline_uses_cache_only_or_names_missing_files(hub, hf_env, tmp_path):
    arts = tmp_path / "arts"
    prepare(arts / "m", "test-org/tiny-sharded")
    offline = {**hf_env, "HF_HUB_OFFLINE": "1"}
    r = cli(["--artifacts", arts, "fetch-weights", "m"], offline)
    assert r.returncode == errors.CODE["offline-miss"], r.stderr
    line = error_line(r)
    assert "model-00001-of-00003.safetensors" in line and "model-00003-of-00003.safetensors" in line
    assert cli(["--artifacts", arts, "fetch-weights", "m"], hf_env).returncode == 0
    hub.reset_counters()
    r = cli(["--artifacts", arts, "fetch-weights", "m", "--force"], offline)
    assert r.returncode == 0, r.stderr
    assert sum(hub.requests.values()) == 0


def test_corrupt_blob_is_integrity_error_and_removed(hub, hf_env, tmp_path):
    arts = tmp_path / "arts"
    prepare(arts / "m", "test-org/tiny-single")
    hub.corrupt("test-org/tiny-single", "model.safetensors")
    r = cli(["--artifacts", arts, "fetch-weights", "m"], hf_env)
    assert r.returncode == errors.CODE["integrity"], r.stderr
    line = error_line(r)
    good = hub.file_entry("test-org/tiny-single", "model.safetensors").sha256
    assert "model.safetensors" in line and good in line and len([w for w in line.split() if len(w) >= 64]) >= 2
    repo_dir = hubmod.repo_folder(Path(hf_env["HF_HUB_CACHE"]), "test-org/tiny-single")
    assert not list((repo_dir / "blobs").glob(good + "*"))
    assert not list(repo_dir.glob("snapshots/*/model.safetensors"))
    assert not manifest_path(arts / "m", "fetch-weights").exists()
    hub.corrupt("test-org/tiny-single", "model.safetensors", enabled=False)
    assert cli(["--artifacts", arts, "fetch-weights", "m"], hf_env).returncode == 0


def test_verify_rehashes_and_reports_each_file(hub, hf_env, tmp_path):
    arts = tmp_path / "arts"
    prepare(arts / "m", "test-org/tiny-sharded")
    assert cli(["--artifacts", arts, "fetch-weights", "m"], hf_env).returncode == 0
    r = cli(["--artifacts", arts, "verify", "m", "--json"], hf_env)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["files"]
    assert {x["path"] for x in rows if x["stage"] == "fetch-weights"} >= {
        "model-00001-of-00003.safetensors",
        "model.safetensors.index.json",
    } and all(x["ok"] for x in rows)
    out = read(manifest_path(arts / "m", "fetch-weights")).outputs
    blob = (Path(hf_env["HF_HUB_CACHE"]) / out["folder"] / out["files"][0]["path"]).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size: only a re-hash can tell
    blob.write_bytes(bytes(data))
    r = cli(["--artifacts", arts, "verify", "m", "--json"], hf_env)
    assert r.returncode == errors.CODE["integrity"]
    bad = [x for x in json.loads(r.stdout)["files"] if not x["ok"]]
    assert [x["path"] for x in bad] == [out["files"][0]["path"]] and "sha256" in bad[0]["reason"]
    hub.reset_counters()
    r = cli(["--artifacts", arts, "fetch-weights", "m", "--force"], hf_env)  # repairs: re-downloads that one file
    assert r.returncode == 0, r.stderr
    assert set(weight_bytes_served(hub, "test-org/tiny-sharded")) == {out["files"][0]["path"]}
    assert cli(["--artifacts", arts, "verify", "m"], hf_env).returncode == 0


@pytest.fixture
def slow_repo(hub, tmp_path_factory):
    """fw/slow: a Llama-shaped checkpoint of about 60 MB in 3 shards (committed once per session).

    Shards are larger than huggingface_hub's 10 MiB download chunk, the unit in which a partial file grows
    on disk, so a download killed part-way leaves bytes to resume from."""
    from tests.support.checkpoints import build_large_checkpoint

    repo = "fw/slow"
    if not getattr(hub, "_fw_slow_built", False):
        folder = tmp_path_factory.mktemp("large")
        hub.commit(repo, build_large_checkpoint(folder, total_bytes=60e6, num_shards=3, fill="random"))
        shutil.rmtree(folder)
        hub._fw_slow_built = True
    return repo


def _wait(cond, timeout=60.0, what=""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _settle(hub, quiet: float = 0.3, timeout: float = 10.0) -> None:
    """Wait until the hub's handlers of a killed client have stopped sending (a throttled handler counts
    a chunk before it finds the peer gone), so counters reset afterwards see only the next run."""
    end, last, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < end:
        now = hub.bytes_served
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)


def test_sigkill_mid_download_resumes_only_unfinished_files(hub, hf_env, slow_repo, tmp_path):
    arts = tmp_path / "arts"
    prepare(arts / "m", slow_repo)
    sizes = {p: e.size for p, e in hub.files(slow_repo).items() if p.endswith(".safetensors")}
    blobs = hubmod.repo_folder(Path(hf_env["HF_HUB_CACHE"]), slow_repo) / "blobs"
    hub.throttle(8e6)
    proc = popen_cli(
        ["--artifacts", arts, "fetch-weights", "m", "--max-workers", "1"],
        env=hf_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def partway():
            done = [
                p
                for p in blobs.glob("*")
                if not p.name.endswith((".incomplete", ".lock")) and p.stat().st_size in sizes.values()
            ]
            part = [p for p in blobs.glob("*.incomplete") if p.stat().st_size > 0]
            if proc.poll() is not None:
                raise AssertionError(f"fetch ended early ({proc.returncode}): {proc.stderr.read()}")
            return len(done) >= 1 and part

        _wait(partway, what="one finished shard and one partial shard")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _settle(hub)
    first = weight_bytes_served(hub, slow_repo)
    finished = {p for p, n in first.items() if n == sizes[p]}
    partial = {p for p, n in first.items() if 0 < n < sizes[p]}
    assert finished and partial
    hub.throttle(None)
    hub.reset_counters()
    r = cli(["--artifacts", arts, "fetch-weights", "m"], hf_env)
    assert r.returncode == 0, r.stderr
    second = weight_bytes_served(hub, slow_repo)
    assert not finished & set(second)  # finished files are not transferred again
    for p in partial:  # the interrupted one resumes with a Range request
        assert 0 < second.get(p, 0) < sizes[p]
    assert sum(second.values()) < sum(sizes.values())
    r = cli(["--artifacts", arts, "verify", "m"], hf_env)
    assert r.returncode == 0, r.stderr


def test_W17_two_processes_download_once(hub, hf_env, slow_repo, tmp_path):
    arts = tmp_path / "arts"
    prepare(arts / "a", slow_repo)
    shutil.copytree(arts / "a", arts / "b")
    hub.throttle(15e6)  # ~4 s of download: the second process starts while the first holds the lock
    procs = [
        popen_cli(
            ["--artifacts", arts, "fetch-weights", run],
            env=hf_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run in ("a", "b")
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    sizes = {p: e.size for p, e in hub.files(slow_repo).items() if p.endswith(".safetensors")}
    assert weight_bytes_served(hub, slow_repo) == sizes  # every shard transferred exactly once
    assert any(
        "waiting for another process fetching fw/slow" in err and "are in the cache" in err for _, err in outs
    ), outs
    a, b = (read(manifest_path(arts / r, "fetch-weights")).outputs for r in ("a", "b"))
    assert a == b


def test_ctrl_c_during_fetch_starts_no_further_file(tmp_path):
    """KeyboardInterrupt stops the pool from starting the queued files (it used to wait for all of them)."""
    s = hubmod.HubSettings(
        endpoint="http://127.0.0.1:9", token=None, token_source=None, cache_dir=tmp_path, offline=True
    )
    files = [{"path": f"model-{i:05d}.safetensors"} for i in range(20)]
    seen = []

    def post(rel, path):
        seen.append(rel)
        time.sleep(0.02)
        if rel == files[0]["path"]:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        dl.fetch_parallel(s, "test-org/x", "0" * 40, files, to_fetch=set(), post=post, max_workers=1, progress=False)
    assert len(seen) < len(files) // 2, seen
