"""What prestage's hub client relies on in huggingface_hub, pinned against the local hub, so an upgrade that
changes any of it fails here first, loudly, rather than as a hang or a wrong file in the field.

prestage.stages.hub calls no private huggingface_hub function (no name starting with "_", nothing from
huggingface_hub.file_download's internals): only HfApi.model_info, get_hf_file_metadata, hf_hub_url,
get_session, build_hf_headers and hf_raise_for_status, plus the cache layout it writes for the library to
read. Each test names the behaviour prestage depends on: the signature and the effect.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import pytest

from prestage.stages import hub as hubmod
from prestage.stages.base import Reporter
from tests.support.hub_server import GATED_TOKEN


def test_model_info_takes_timeout_and_token_and_files_metadata():
    from huggingface_hub import HfApi

    params = inspect.signature(HfApi.model_info).parameters
    for name in ("revision", "timeout", "files_metadata", "token"):
        assert name in params, f"HfApi.model_info lost `{name}`"


def test_model_info_applies_an_httpx2_timeout_and_does_not_retry_itself(hub, hf_env):
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=hub.url, token=False)
    hub.stall("answer", match="/api/models/test-org/tiny-single")
    t0 = time.monotonic()
    with pytest.raises(httpx2.ReadTimeout):  # the timeout object reaches the request: no hang
        api.model_info("test-org/tiny-single", timeout=httpx2.Timeout(connect=2, read=0.5, write=0.5, pool=2))
    assert time.monotonic() - t0 < 3
    hub.reset_hooks()
    hub.fail_next(1, status=503, match="/api/models/test-org/tiny-single", retry_after="1")
    with pytest.raises(HfHubHTTPError) as ei:
        api.model_info("test-org/tiny-single", timeout=5)
    assert ei.value.response.status_code == 503 and ei.value.response.headers["Retry-After"] == "1"
    assert len(hub.request_log) == 1  # one request: prestage owns the retries


def test_model_info_files_metadata_gives_sizes_and_lfs_sha256(hub, hf_env):
    from huggingface_hub import HfApi

    info = HfApi(endpoint=hub.url).model_info("test-org/tiny-single", files_metadata=True, token=False, timeout=5)
    assert info.sha == hub.seeded["test-org/tiny-single"]
    sib = {s.rfilename: s for s in info.siblings}
    entry = hub.file_entry("test-org/tiny-single", "model.safetensors")
    assert sib["model.safetensors"].size == entry.size and sib["model.safetensors"].lfs.sha256 == entry.sha256
    assert sib["config.json"].lfs is None


def test_get_hf_file_metadata_signature_and_fields(hub, hf_env):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    params = inspect.signature(get_hf_file_metadata).parameters
    for name in ("url", "token", "timeout", "endpoint"):
        assert name in params, f"get_hf_file_metadata lost `{name}`"
    sha = hub.seeded["test-org/tiny-single"]
    lfs = hub.file_entry("test-org/tiny-single", "model.safetensors")
    url = hf_hub_url("test-org/tiny-single", "model.safetensors", revision=sha, endpoint=hub.url)
    meta = get_hf_file_metadata(url, token=False, timeout=5, endpoint=hub.url)
    assert meta.etag == lfs.sha256 and meta.size == lfs.size  # unquoted; the LFS file's size, not the pointer's
    assert meta.location.startswith("http")
    small = hub.file_entry("test-org/tiny-single", "config.json")
    url = hf_hub_url("test-org/tiny-single", "config.json", revision=sha, endpoint=hub.url)
    meta = get_hf_file_metadata(url, token=False, timeout=5, endpoint=hub.url)
    assert meta.etag == small.blob_id and meta.size == small.size


def test_get_hf_file_metadata_does_not_retry_and_keeps_the_response(hub, hf_env):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    url = hf_hub_url("test-org/tiny-single", "config.json", endpoint=hub.url)
    hub.fail_next(1, status=429, match="config.json", retry_after="2")
    with pytest.raises(HfHubHTTPError) as ei:
        get_hf_file_metadata(url, token=False, timeout=5, endpoint=hub.url)
    assert ei.value.response.status_code == 429 and ei.value.response.headers["Retry-After"] == "2"
    assert len(hub.request_log) == 1


def test_build_hf_headers_token_false_never_looks_one_up(monkeypatch):
    from huggingface_hub.utils import build_hf_headers

    monkeypatch.setenv("HF_TOKEN", GATED_TOKEN)
    assert "authorization" not in {k.lower() for k in build_hf_headers(token=False)}
    assert build_hf_headers(token="abc")["authorization"] == "Bearer abc"


def test_get_session_streams_and_hf_raise_for_status_maps_errors(hub, hf_env):
    import httpx2
    from huggingface_hub import get_session
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.utils import hf_raise_for_status

    assert isinstance(get_session(), httpx2.Client)
    url = f"{hub.url}/test-org/tiny-single/resolve/main/nope.json"
    with get_session().stream("GET", url, timeout=httpx2.Timeout(5), follow_redirects=True) as r:
        assert r.status_code == 404
        r.read()
        with pytest.raises(EntryNotFoundError):
            hf_raise_for_status(r)


def test_files_prestage_downloads_are_the_librarys_cache(hub, hf_env):
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    s = hubmod.settings({})
    sha = hub.seeded["test-org/tiny-single"]
    client = hubmod.HubClient(s, Reporter(quiet=True))
    for rel in ("config.json", "model.safetensors"):
        ours = client.download("test-org/tiny-single", rel, sha)
        theirs = hf_hub_download("test-org/tiny-single", rel, revision=sha, local_files_only=True)
        assert Path(theirs) == ours and Path(try_to_load_from_cache("test-org/tiny-single", rel, revision=sha)) == ours
        assert ours.is_symlink() and ours.resolve().parent.name == "blobs"
