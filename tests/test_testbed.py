"""Proves the offline test bed is real: the trained tokenizer, the tiny checkpoints, and LocalHub as seen
by unmodified huggingface_hub and transformers clients (happy paths, resume, errors, test hooks)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.hub_server import GATED_TOKEN, LocalHub, git_blob_sha1


def _raw(method: str, url: str, headers: dict | None = None, follow: bool = False):
    """One plain HTTP request (stdlib) -> (status, headers, body); follows one same-origin redirect if asked."""
    parts = url.split("/", 3)
    conn = http.client.HTTPConnection(parts[2], timeout=30)
    conn.request(method, "/" + parts[3], headers=headers or {})
    resp = conn.getresponse()
    status, hdrs, body = resp.status, dict(resp.getheaders()), resp.read()
    conn.close()
    if follow and status in (301, 302, 307) and hdrs.get("Location", "").startswith("/"):
        return _raw(method, "/".join(parts[:3]) + hdrs["Location"], headers)
    return status, hdrs, body


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_trains_real_bpe_and_round_trips():
    from tests.support.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer()
    assert len(tok) == 1024
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [1021, 1022, 1023]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for text in ("def main(argv):\n    return 0\n", "Grüße, 世界! \t  trailing  ", "<|im_start|>user\nhi<|im_end|>"):
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    # BPE merges were learned: common code words take fewer tokens than their bytes.
    assert len(tok("return self")["input_ids"]) < len("return self") / 2
    assert tok("<|im_end|>")["input_ids"] == [1023]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_layouts_have_expected_files(checkpoint_dirs):
    single, sharded, binary = (checkpoint_dirs[k] for k in ("single", "sharded", "bin"))
    common = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert common | {"model.safetensors"} <= {p.name for p in single.iterdir()}
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all((sharded / s).exists() for s in shards)
    names = {p.name for p in binary.iterdir()}
    assert "pytorch_model.bin" in names and not any(n.endswith(".safetensors") for n in names)
    config = json.loads((single / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (1024, 64, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)


def test_checkpoint_is_deterministic_per_seed(tmp_path):
    from tests.support.checkpoints import build_checkpoint

    a = build_checkpoint(tmp_path / "a", seed=3, with_tokenizer=False)
    b = build_checkpoint(tmp_path / "b", seed=3, with_tokenizer=False)
    c = build_checkpoint(tmp_path / "c", seed=4, with_tokenizer=False)
    assert _sha256(a / "model.safetensors") == _sha256(b / "model.safetensors")
    assert _sha256(a / "model.safetensors") != _sha256(c / "model.safetensors")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3", "gpt2"])
def test_checkpoint_other_archs_load(tmp_path, arch):
    import transformers

    from tests.support.checkpoints import build_checkpoint

    path = build_checkpoint(tmp_path / arch, arch=arch, with_tokenizer=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == 1024 and model.config.model_type == arch
    logits = model(input_ids=__import__("torch").tensor([[1, 2, 3]])).logits  # [1, 3, vocab]
    assert tuple(logits.shape) == (1, 3, 1024)


def test_large_checkpoint_is_consistent(tmp_path):
    from safetensors import safe_open

    from tests.support.checkpoints import build_large_checkpoint

    out = build_large_checkpoint(tmp_path / "large", total_bytes=30e6, num_shards=4)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 4
    seen = {}
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            seen.update({name: shard for name in f.keys()})
    assert seen == index["weight_map"]
    size = sum((out / s).stat().st_size for s in shards)
    assert 0.5 * 30e6 < index["metadata"]["total_size"] <= size < 1.6 * 30e6
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


# -------------------------------------------------------------------------------------- hub: happy paths
def test_model_info_with_files_metadata(hub, checkpoint_dirs):
    from huggingface_hub import HfApi

    info = HfApi(endpoint=hub.url).model_info("test-org/tiny-single", files_metadata=True)
    assert info.sha == hub.resolve("test-org/tiny-single") and len(info.sha) == 40
    sib = {s.rfilename: s for s in info.siblings}
    local = checkpoint_dirs["single"]
    assert set(sib) == {p.name for p in local.iterdir()}
    weights = sib["model.safetensors"]
    assert weights.lfs is not None and weights.lfs.sha256 == _sha256(local / "model.safetensors")
    assert weights.size == (local / "model.safetensors").stat().st_size
    config = sib["config.json"]
    assert config.lfs is None and config.blob_id == git_blob_sha1((local / "config.json").read_bytes())
    assert info.gated is False
    assert HfApi(endpoint=hub.url).model_info("test-org/tiny-single", revision="v1.0").sha == info.sha


def test_hf_hub_download_follows_lfs_redirect_and_caches(hub, hf_env, checkpoint_dirs):
    from huggingface_hub import hf_hub_download

    local = checkpoint_dirs["single"] / "model.safetensors"
    path = Path(hf_hub_download("test-org/tiny-single", "model.safetensors"))
    assert path.read_bytes() == local.read_bytes()
    sha = hub.resolve("test-org/tiny-single")
    cache = Path(hf_env["HF_HUB_CACHE"]) / "models--test-org--tiny-single"
    assert path == cache / "snapshots" / sha / "model.safetensors"
    assert (cache / "blobs" / _sha256(local)).exists()  # LFS etag == sha256
    assert (cache / "refs" / "main").read_text() == sha
    assert hub.requests["HEAD /test-org/tiny-single/resolve/main/model.safetensors"] == 1
    assert any(m == "GET" and p.startswith("/_lfs/") and s == 200 for m, p, s in hub.request_log)
    served = hub.bytes_served["test-org/tiny-single/model.safetensors"]
    assert served == local.stat().st_size
    # Cached: the second call only sends the HEAD.
    hf_hub_download("test-org/tiny-single", "model.safetensors")
    assert hub.bytes_served["test-org/tiny-single/model.safetensors"] == served
    assert hub.requests["HEAD /test-org/tiny-single/resolve/main/model.safetensors"] == 2
    # And the cache it left serves offline look-ups with no request at all.
    before = len(hub.request_log)
    assert Path(hf_hub_download("test-org/tiny-single", "model.safetensors", local_files_only=True)) == path
    assert len(hub.request_log) == before


def test_snapshot_download_allow_patterns_and_tree(hub, hf_env, checkpoint_dirs):
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download("test-org/tiny-sharded", allow_patterns=["*.json"]))
    expected = {p.name for p in checkpoint_dirs["sharded"].iterdir() if p.name.endswith(".json")}
    assert {p.name for p in folder.iterdir()} == expected
    assert not any(k.endswith(".safetensors") for k in hub.bytes_served)
    sha = hub.resolve("test-org/tiny-sharded")
    assert hub.requests[f"GET /api/models/test-org/tiny-sharded/tree/{sha}"] == 1


def test_tree_listing_paginates_with_link_header(hub):
    from huggingface_hub import HfApi

    hub.tree_page_size = 2
    files = [f.path for f in HfApi(endpoint=hub.url).list_repo_tree("test-org/tiny-sharded", recursive=True)]
    assert sorted(files) == sorted(hub.files("test-org/tiny-sharded"))
    assert hub.requests["GET /api/models/test-org/tiny-sharded/tree/main"] == (len(files) + 1) // 2


def test_range_request_and_http_get_resume(hub, checkpoint_dirs, tmp_path):
    from huggingface_hub.file_download import http_get

    data = (checkpoint_dirs["single"] / "model.safetensors").read_bytes()
    url = f"{hub.url}/test-org/tiny-single/resolve/main/model.safetensors"
    status, headers, body = _raw("GET", url, {"Range": "bytes=1000-1999"}, follow=True)
    assert status == 206 and body == data[1000:2000]
    assert headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    # huggingface_hub's own resume primitive: continue a partial file with a Range request.
    half = len(data) // 2
    hub.reset_counters()
    target = tmp_path / "part"
    with open(target, "wb") as f:
        f.write(data[:half])
        blob = hub.file_entry("test-org/tiny-single", "model.safetensors").sha256
        http_get(
            f"{hub.url}/_lfs/{blob}?repo=test-org%2Ftiny-single&commit={hub.resolve('test-org/tiny-single')}"
            f"&path=model.safetensors",
            f,
            resume_size=half,
            expected_size=len(data),
        )
    assert target.read_bytes() == data
    assert hub.bytes_served["test-org/tiny-single/model.safetensors"] == len(data) - half
    assert [s for m, _, s in hub.request_log] == [206]


def test_dropped_connection_is_resumed_by_client(hub, hf_env, checkpoint_dirs):
    from huggingface_hub import hf_hub_download

    local = checkpoint_dirs["sharded"] / "model-00001-of-00003.safetensors"
    hub.cut_next(100_000, match="model-00001")
    path = hf_hub_download("test-org/tiny-sharded", "model-00001-of-00003.safetensors")
    assert Path(path).read_bytes() == local.read_bytes()
    # The client retried after the drop. (It re-reads from 0 here: huggingface_hub counts progress in 10 MB
    # chunks, so a drop inside the first chunk resumes at byte 0; test_range_request... covers Range.)
    assert hub.downloads["test-org/tiny-sharded/model-00001-of-00003.safetensors"] == 2
    assert hub.bytes_served["test-org/tiny-sharded/model-00001-of-00003.safetensors"] == 100_000 + local.stat().st_size


def test_old_commits_stay_servable_by_sha(hub, hf_env):
    from huggingface_hub import HfApi, hf_hub_download

    first = hub.commit("testbed/revs", {"a.txt": b"one", "w.safetensors": b"x" * 100}, tag="v1")
    second = hub.commit("testbed/revs", {"a.txt": b"two"}, branch="main")
    dev = hub.commit("testbed/revs", {"a.txt": b"dev"}, branch="dev")
    assert len({first, second, dev}) == 3
    assert Path(hf_hub_download("testbed/revs", "a.txt", revision=first)).read_bytes() == b"one"
    assert Path(hf_hub_download("testbed/revs", "a.txt", revision="v1")).read_bytes() == b"one"
    assert Path(hf_hub_download("testbed/revs", "a.txt")).read_bytes() == b"two"
    assert Path(hf_hub_download("testbed/revs", "a.txt", revision="dev")).read_bytes() == b"dev"
    assert Path(hf_hub_download("testbed/revs", "w.safetensors")).read_bytes() == b"x" * 100  # kept from parent
    api = HfApi(endpoint=hub.url)
    assert api.model_info("testbed/revs", revision="dev").sha == dev
    refs = api.list_repo_refs("testbed/revs")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second, "dev": dev}
    assert [c.commit_id for c in api.list_repo_commits("testbed/revs")] == [second, first]


def test_commit_shas_are_deterministic(tmp_path):
    shas = []
    for name in ("h1", "h2"):
        h = LocalHub(tmp_path / name)
        shas.append([h.commit("o/r", {"a": b"1"}), h.commit("o/r", {"b": b"2"})])
    assert shas[0] == shas[1] and shas[0][0] != shas[0][1]
    assert h.commit("o/r", {"b": b"2"}) == shas[1][1]  # unchanged tree: no new commit
    assert LocalHub(tmp_path / "h2").resolve("o/r") == shas[1][1]  # state persists in storage_dir


@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
def test_transformers_loads_each_layout(hub, hf_env, checkpoint_dirs, layout):
    import torch
    import transformers

    repo = f"test-org/tiny-{layout}"
    config = transformers.AutoConfig.from_pretrained(repo)
    assert config.model_type == "qwen2" and config.vocab_size == 1024
    tok = transformers.AutoTokenizer.from_pretrained(repo)
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"
    model = transformers.AutoModelForCausalLM.from_pretrained(repo)
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dirs[layout])
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    weights = "pytorch_model.bin" if layout == "bin" else ".safetensors"
    assert any(weights in k for k in hub.bytes_served)


# ---------------------------------------------------------------------------------------- hub: errors
def test_error_cases_raise_hub_error_classes(hub, hf_env):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi(endpoint=hub.url)
    with pytest.raises(RepositoryNotFoundError) as e:
        api.model_info("test-org/missing")
    assert e.value.response.status_code == 404 and not isinstance(e.value, GatedRepoError)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-org/missing", "config.json")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("test-org/tiny-single", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("test-org/tiny-single", "config.json", revision="nope")
    with pytest.raises(RemoteEntryNotFoundError) as e:
        hf_hub_download("test-org/tiny-single", "missing.json")
    assert e.value.response.headers["X-Repo-Commit"] == hub.resolve("test-org/tiny-single")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("test-org/no-config", "config.json")

    # gated: info is public, files need a granted token
    assert api.model_info("test-org/gated").gated == "manual"
    with pytest.raises(GatedRepoError) as e:
        hf_hub_download("test-org/gated", "config.json")
    assert e.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as e:
        hf_hub_download("test-org/gated", "config.json", token="hf_wrong")
    assert e.value.response.status_code == 403
    assert Path(hf_hub_download("test-org/gated", "model.safetensors", token=GATED_TOKEN)).stat().st_size > 0

    # private: looks missing without a token
    with pytest.raises(RepositoryNotFoundError) as e:
        api.model_info("test-org/private")
    assert e.value.response.status_code == 401 and not isinstance(e.value, GatedRepoError)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-org/private", "config.json")
    assert api.model_info("test-org/private", token=GATED_TOKEN).private is True


def test_transformers_errors_are_oserrors(hub, hf_env):
    import transformers
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    with pytest.raises(OSError) as e:
        transformers.AutoConfig.from_pretrained("test-org/missing")
    assert isinstance(e.value.__cause__, RepositoryNotFoundError)
    with pytest.raises(OSError) as e:
        transformers.AutoConfig.from_pretrained("test-org/gated")
    assert isinstance(e.value.__cause__, GatedRepoError)
    # A repo without config.json: transformers 5 raises ValueError (not OSError) naming model_type.
    with pytest.raises(ValueError, match="model_type"):
        transformers.AutoConfig.from_pretrained("test-org/no-config")


# ------------------------------------------------------------------------------------------ hub: hooks
def test_corrupt_serves_same_size_wrong_hash(hub, hf_env, checkpoint_dirs):
    from huggingface_hub import hf_hub_download

    local = checkpoint_dirs["single"] / "model.safetensors"
    hub.corrupt("test-org/tiny-single", "model.safetensors")
    got = Path(hf_hub_download("test-org/tiny-single", "model.safetensors")).read_bytes()
    assert len(got) == local.stat().st_size
    assert hashlib.sha256(got).hexdigest() != hub.file_entry("test-org/tiny-single", "model.safetensors").sha256


def test_fail_next_and_unknown_routes(hub):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    hub.fail_next(1, status=503)
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=hub.url).model_info("test-org/tiny-single")
    assert e.value.response.status_code == 503
    assert HfApi(endpoint=hub.url).model_info("test-org/tiny-single").sha  # only one failure
    status, headers, _ = _raw("GET", f"{hub.url}/api/agent-harnesses")
    assert status == 404 and "X-Error-Code" not in headers
    status, headers, _ = _raw("HEAD", f"{hub.url}/test-org/tiny-single/resolve/main/model.safetensors")
    assert status == 302 and headers["X-Linked-Size"] and headers["X-Repo-Commit"]
    assert not any(k.lower().startswith("x-xet") or k.lower() == "link" for k in headers)


def test_throttle_slows_serving(hub):
    hub.throttle(1_600_000)
    t0 = time.monotonic()
    status, _, body = _raw("GET", f"{hub.url}/test-org/tiny-single/resolve/main/model.safetensors", follow=True)
    elapsed = time.monotonic() - t0
    assert status == 200 and len(body) > 500_000 and elapsed > 0.8 * len(body) / 1_600_000


def test_cli_serves_seeded_demo(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.hub_server", "--storage", str(tmp_path / "s"), "--seed-demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else url
        info = json.loads(_raw("GET", f"{url}/api/models/prestage-demo/tiny-qwen2?blobs=true")[2])
        assert "model.safetensors" in {s["rfilename"] for s in info["siblings"]} and len(info["sha"]) == 40
    finally:
        proc.terminate()
        proc.wait(timeout=10)
