"""The one hub client (prestage.stages.hub.HubClient) against the real local hub: a stalled hub ends every
hub call prestage makes in `network` (exit 6) within the stated bound, Retry-After is honoured (the wait is
measured), the token goes out only when one was given, retries say one line each, and Ctrl-C during a
weight download exits 130 within about a second and leaves a partial file that the next run resumes.

The timeouts are made small with PRESTAGE_HUB_TIMEOUT so the stalls end fast; the hub's stall hook holds
a request until the test's hub fixture lifts it, so nothing here can hang past that.
"""

from __future__ import annotations

import signal
import subprocess
import time
from email.utils import formatdate
from pathlib import Path

import pytest

from prestage.runner.chain import run_stage
from prestage.stages import errors
from prestage.stages import hub as hubmod
from prestage.stages.base import Reporter
from tests.support.cli import REPO_ROOT, popen_cli, run_cli
from tests.support.hub_server import GATED_TOKEN

TIMEOUT = 0.5  # PRESTAGE_HUB_TIMEOUT in these tests: connect and read
BOUND = hubmod.call_bound(TIMEOUT, TIMEOUT)
SLACK = 1.5  # the stage's own work around the stalled call, on a loaded 2-core machine
QUIET = Reporter(quiet=True)


class Lines(Reporter):
    """A reporter that keeps its info lines."""

    def __init__(self):
        super().__init__(quiet=True)
        self.lines: list[str] = []

    def info(self, msg: str) -> None:
        self.lines.append(msg)


@pytest.fixture
def fast(monkeypatch, hf_env):
    monkeypatch.setenv(hubmod.TIMEOUT_ENV, str(TIMEOUT))
    return {**hf_env, hubmod.TIMEOUT_ENV: str(TIMEOUT)}


def _stalled(fn) -> tuple[errors.PrestageError, float]:
    t0 = time.monotonic()
    with pytest.raises(errors.PrestageError) as ei:
        fn()
    took = time.monotonic() - t0
    return ei.value, took


def _assert_network_within_bound(err: errors.PrestageError, took: float) -> None:
    assert err.kind == "network" and err.exit_code == 6, err
    assert took <= BOUND + SLACK, f"{took:.1f} s > bound {BOUND} s: {err}"
    assert "\n" not in str(err)


# ---- the bound and its setting ------------------------------------------------------------------------


def test_defaults_are_sane_and_the_bound_is_stated():
    assert hubmod.CONNECT_TIMEOUT_S == 10 and 30 <= hubmod.READ_TIMEOUT_S <= 60
    assert hubmod.STALL_BOUND_S == hubmod.call_bound(hubmod.CONNECT_TIMEOUT_S, hubmod.READ_TIMEOUT_S)
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"{hubmod.STALL_BOUND_S:g} s" in readme and hubmod.TIMEOUT_ENV in readme


def test_timeout_env_forms_and_a_bad_value(monkeypatch):
    monkeypatch.setenv(hubmod.TIMEOUT_ENV, "2")
    assert hubmod.timeouts_from_env() == (2.0, 2.0)
    monkeypatch.setenv(hubmod.TIMEOUT_ENV, "3,7.5")
    assert hubmod.timeouts_from_env() == (3.0, 7.5)
    for bad in ("soon", "0", "1,2,3", "-1"):
        monkeypatch.setenv(hubmod.TIMEOUT_ENV, bad)
        with pytest.raises(errors.UsageError, match=hubmod.TIMEOUT_ENV):
            hubmod.timeouts_from_env()


def test_retry_after_parses_seconds_and_http_dates():
    assert hubmod.retry_after_seconds({"Retry-After": "7"}) == 7.0
    now = time.time()
    assert 9 <= hubmod.retry_after_seconds({"retry-after": formatdate(now + 10, usegmt=True)}, now=now) <= 10
    assert hubmod.retry_after_seconds({"Retry-After": formatdate(now - 10, usegmt=True)}, now=now) == 0.0
    assert hubmod.retry_after_seconds({"Retry-After": "whenever"}) is None
    assert hubmod.retry_after_seconds({}) is None


# ---- a stalled hub, for each hub call ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["answer"])
def test_stall_on_repo_info_in_resolve(hub, fast, tmp_path, mode):
    hub.stall(mode, match="/api/models/test-org/tiny-single")
    err, took = _stalled(lambda: run_stage("resolve", tmp_path / "r", {"model": "test-org/tiny-single"}, QUIET))
    _assert_network_within_bound(err, took)
    assert "test-org/tiny-single@main" in str(err) and "no answer" in str(err)


@pytest.mark.parametrize("mode,match", [("answer", "/resolve/"), ("body", "config.json")])
def test_stall_on_config_json_download_in_resolve(hub, fast, tmp_path, mode, match):
    hub.stall(mode, match=match)
    err, took = _stalled(lambda: run_stage("resolve", tmp_path / "r", {"model": "test-org/tiny-single"}, QUIET))
    _assert_network_within_bound(err, took)
    assert "(config.json)" in str(err)


def test_stall_on_tokenizer_listing_of_another_repo(hub, fast, tmp_path):
    params = {"model": "test-org/tiny-single", "tokenizer": "test-org/tiny-sharded"}
    run_stage("resolve", tmp_path / "r", params, QUIET)
    run_stage("configure", tmp_path / "r", params, QUIET)  # tokenize-prep reads configure's manifest
    hub.stall("answer", match="/api/models/test-org/tiny-sharded")
    err, took = _stalled(lambda: run_stage("tokenize-prep", tmp_path / "r", params, QUIET))
    _assert_network_within_bound(err, took)
    assert "test-org/tiny-sharded" in str(err) and "(tokenizer)" in str(err)


@pytest.mark.parametrize("mode", ["answer", "body"])
def test_stall_on_tokenizer_snapshot_download(hub, fast, tmp_path, mode):
    params = {"model": "test-org/tiny-single"}
    run_stage("resolve", tmp_path / "r", params, QUIET)
    run_stage("configure", tmp_path / "r", params, QUIET)  # tokenize-prep reads configure's manifest
    hub.stall(mode, match="tokenizer")
    err, took = _stalled(lambda: run_stage("tokenize-prep", tmp_path / "r", params, QUIET))
    _assert_network_within_bound(err, took)
    assert "tokenizer" in str(err)


@pytest.mark.parametrize("mode,match", [("answer", ".safetensors"), ("body", ".safetensors")])
def test_stall_on_weight_download(hub, fast, tmp_path, mode, match):
    params = {"model": "test-org/tiny-single"}
    run_stage("resolve", tmp_path / "r", params, QUIET)
    run_stage("configure", tmp_path / "r", params, QUIET)
    hub.stall(mode, match=match)
    err, took = _stalled(lambda: run_stage("fetch-weights", tmp_path / "r", params, QUIET))
    _assert_network_within_bound(err, took)
    assert "model.safetensors" in str(err)
    assert not (tmp_path / "r" / "fetch-weights.msgpack").exists()


@pytest.mark.parametrize("mode", ["answer", "body"])
def test_stall_on_remote_code_download(hub, fast, tmp_path, mode):
    from prestage.stages.configure import hf_config

    sha = hub.commit("hc/remote", {"configuration_x.py": "X = 1\n", "config.json": "{}"})
    hub.stall(mode, match="configuration_x.py")
    err, took = _stalled(lambda: hf_config._download({"repo_id": "hc/remote", "commit": sha}, "configuration_x.py", {}))
    _assert_network_within_bound(err, took)
    hub.reset_hooks()
    path = hf_config._download({"repo_id": "hc/remote", "commit": sha}, "configuration_x.py", {})
    assert path.read_text() == "X = 1\n"


def test_stalled_hub_ends_the_cli_with_exit_6_and_one_line(hub, fast, tmp_path, prestage):
    hub.stall("answer")
    t0 = time.monotonic()
    r = prestage(["--artifacts", tmp_path, "resolve", "test-org/tiny-single"], env=fast, timeout=120)
    took = time.monotonic() - t0
    assert r.rc == 6, r
    lines = [x for x in r.stderr.splitlines() if x.startswith("prestage: error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert took < BOUND + 15  # the bound plus the interpreter's start
    retries = [x for x in r.stderr.splitlines() if "retrying in" in x]
    assert len(retries) == hubmod.ATTEMPTS - 1, r.stderr  # one line per retry, no library chatter
    rest = [x for x in r.stderr.splitlines() if x not in retries and x not in lines and x != "resolve: running"]
    assert not rest, r.stderr


# ---- Retry-After ----------------------------------------------------------------------------------------


def test_retry_after_seconds_is_waited_and_reported_once_per_retry(hub, hf_env, tmp_path):
    hub.fail_next(2, status=429, match="/api/models/test-org/tiny-single", retry_after="1")
    rep = Lines()
    t0 = time.monotonic()
    run_stage("resolve", tmp_path / "r", {"model": "test-org/tiny-single"}, rep)
    took = time.monotonic() - t0
    assert took >= 2.0  # two waits of 1 s, not the 0.5 + 1 s backoff
    retries = [x for x in rep.lines if "retrying" in x]
    assert len(retries) == 2 and all("HTTP 429" in x and "retrying in 1.0 s" in x for x in retries), rep.lines


def test_retry_after_http_date_is_waited(hub, hf_env, tmp_path):
    hub.fail_next(1, status=503, match="config.json", retry_after=formatdate(time.time() + 3, usegmt=True))
    t0 = time.monotonic()
    run_stage("resolve", tmp_path / "r", {"model": "test-org/tiny-single"}, QUIET)
    assert time.monotonic() - t0 >= 1.9  # the date is to the second: 2 to 3 s from now


def test_retry_after_beyond_the_cap_fails_at_once_naming_the_wait(hub, hf_env, tmp_path):
    hub.fail_next(1, status=429, match="/api/models/test-org/tiny-single", retry_after="3600")
    t0 = time.monotonic()
    with pytest.raises(errors.NetworkError, match="3600 s") as ei:
        run_stage("resolve", tmp_path / "r", {"model": "test-org/tiny-single"}, QUIET)
    assert time.monotonic() - t0 < 2 and ei.value.exit_code == 6


def test_persistent_5xx_gives_up_after_the_bounded_tries(hub, hf_env, tmp_path):
    hub.fail_next(10, status=503, match="/api/models/test-org/tiny-single")
    rep = Lines()
    with pytest.raises(errors.NetworkError, match="HTTP 503"):
        run_stage("resolve", tmp_path / "r", {"model": "test-org/tiny-single"}, rep)
    asked = [p for m, p, _ in hub.authorizations if p.startswith("/api/models/test-org/tiny-single")]
    assert len(asked) == hubmod.ATTEMPTS and len([x for x in rep.lines if "retrying" in x]) == hubmod.ATTEMPTS - 1


# ---- the token ------------------------------------------------------------------------------------------


def test_no_token_given_sends_none_even_when_the_library_could_find_one(hub, hf_env, monkeypatch):
    s = hubmod.settings({})
    assert s.token is None
    # Appear only after prestage read its settings: huggingface_hub's own lookup would find both.
    monkeypatch.setenv("HF_TOKEN", GATED_TOKEN)
    Path(hf_env["HF_HOME"], "token").write_text(GATED_TOKEN)
    client = hubmod.HubClient(s, QUIET)
    info = client.repo_info("test-org/tiny-single", "main", files_metadata=True)
    client.download("test-org/tiny-single", "model.safetensors", info.sha)
    seen = hub.authorizations
    assert seen and all(auth is None for _, _, auth in seen), seen
    # and the gated repo, which the library's token would open, stays closed
    with pytest.raises(errors.AuthError, match="no token was given"):
        client.download("test-org/gated", "config.json", hub.seeded["test-org/gated"])


def test_a_given_token_goes_to_every_hub_request(hub, hf_env):
    s = hubmod.settings({"hf_token": GATED_TOKEN})
    client = hubmod.HubClient(s, QUIET)
    sha = client.repo_info("test-org/gated", "main").sha
    path = client.download("test-org/gated", "model.safetensors", sha)
    assert path.stat().st_size == hub.file_entry("test-org/gated", "model.safetensors").size
    seen = hub.authorizations
    assert len(seen) >= 3 and all(auth == f"Bearer {GATED_TOKEN}" for _, _, auth in seen), seen


# ---- Ctrl-C during fetch-weights ------------------------------------------------------------------------


@pytest.fixture
def throttled_repo(hub, tmp_path_factory):
    """hc/slow: about 16 MB in 2 shards (committed once per session)."""
    from tests.support.checkpoints import build_large_checkpoint

    repo = "hc/slow"
    if not getattr(hub, "_hc_slow_built", False):
        folder = tmp_path_factory.mktemp("hc-large")
        hub.commit(repo, build_large_checkpoint(folder, total_bytes=16e6, num_shards=2, fill="random"))
        hub._hc_slow_built = True
    return repo


def test_sigint_during_download_exits_130_at_once_and_the_rerun_resumes(hub, hf_env, throttled_repo, tmp_path):
    arts = tmp_path / "arts"
    params = {"model": throttled_repo}
    run_stage("resolve", arts / "m", params, QUIET)
    run_stage("configure", arts / "m", params, QUIET)
    sizes = {p: e.size for p, e in hub.files(throttled_repo).items() if p.endswith(".safetensors")}
    blobs = hub_blobs(hf_env, throttled_repo)
    hub.throttle(1e6)
    proc = popen_cli(
        ["--artifacts", arts, "fetch-weights", "m"],
        env=hf_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        end = time.monotonic() + 60
        while not any(p.stat().st_size > 100_000 for p in blobs.glob("*.incomplete")):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < end, "no partial file after 60 s"
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert rc == 130, err
    assert took <= 1.0, f"exit took {took:.2f} s after SIGINT"
    assert err.strip().splitlines()[-1] == "prestage: interrupted" and "Traceback" not in err, err
    assert not (arts / "m" / "fetch-weights.msgpack").exists()  # no manifest, half-written or not
    partial = {p.name: p.stat().st_size for p in blobs.glob("*.incomplete")}
    assert partial and all(0 < n for n in partial.values()), partial
    hub.throttle(None)
    time.sleep(0.3)  # the killed client's throttled handlers notice it is gone
    hub.reset_counters()
    r = run_cli(["--artifacts", arts, "fetch-weights", "m"], env=hf_env)  # the rerun needs no process of its own
    assert r.returncode == 0, r.stderr
    assert not list(blobs.glob("*.incomplete"))
    served = {k.split("/", 2)[2]: v for k, v in hub.bytes_served.items() if k.startswith(throttled_repo + "/")}
    assert 206 in [status for _, _, status in hub.request_log]  # the rest was asked for with a Range
    assert sum(served.get(p, 0) for p in sizes) < sum(sizes.values())


def test_second_sigint_exits_at_once_while_a_worker_is_stuck_in_a_stalled_read(hub, hf_env, tmp_path):
    arts = tmp_path / "arts"
    params = {"model": "test-org/tiny-sharded"}
    run_stage("resolve", arts / "m", params, QUIET)
    run_stage("configure", arts / "m", params, QUIET)
    hub.stall("body", match="/_lfs/")  # the shards' bytes (the index JSON comes through)
    proc = popen_cli(
        ["--artifacts", arts, "fetch-weights", "m"],
        env={**hf_env, hubmod.TIMEOUT_ENV: "60"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        end = time.monotonic() + 60
        while not any(m == "GET" and p.startswith("/_lfs/") for m, p, _ in hub.authorizations):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < end, "no weight GET after 60 s"
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.5)
        assert proc.poll() is None  # the stalled worker holds the first exit (up to the 60 s read timeout)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert rc == 130 and took <= 1.0, (rc, took, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "prestage: interrupted", err


def hub_blobs(env: dict, repo: str) -> Path:
    return hubmod.repo_folder(Path(env["HF_HUB_CACHE"]), repo) / "blobs"


def test_a_trickling_hub_ends_in_network_at_the_files_minimum_rate(hub, hf_env, tmp_path, monkeypatch):
    """A hub that sends a little within every read timeout is given up once the file's deadline (grace +
    remaining bytes / minimum rate) has passed; the partial file stays and a later run resumes it."""
    params = {"model": "test-org/tiny-single"}
    run_stage("resolve", tmp_path / "r", params, QUIET)
    run_stage("configure", tmp_path / "r", params, QUIET)
    monkeypatch.setenv(hubmod.MIN_RATE_ENV, "400000,0.5")  # 0.8 MB at 400 kB/s: about 2.5 s allowed
    hub.throttle(40_000)  # 40 kB/s: about 20 s for the file
    t0 = time.monotonic()
    with pytest.raises(errors.NetworkError, match="below the minimum of 400000 B/s") as ei:
        run_stage("fetch-weights", tmp_path / "r", params, QUIET)
    took = time.monotonic() - t0
    assert took < 8, took
    assert "model.safetensors" in str(ei.value) and "\n" not in str(ei.value)
    cache = Path(hf_env["HF_HUB_CACHE"]) / "models--test-org--tiny-single" / "blobs"
    assert any(p.name.endswith(".incomplete") and p.stat().st_size > 0 for p in cache.iterdir())
    hub.throttle(None)
    monkeypatch.delenv(hubmod.MIN_RATE_ENV)
    assert run_stage("fetch-weights", tmp_path / "r", params, QUIET).status == "ran"


def test_min_rate_setting_is_checked(monkeypatch):
    monkeypatch.setenv(hubmod.MIN_RATE_ENV, "fast")
    with pytest.raises(errors.UsageError, match="PRESTAGE_HUB_MIN_RATE='fast'"):
        hubmod.min_rate_from_env()
    monkeypatch.setenv(hubmod.MIN_RATE_ENV, "1000,5")
    assert hubmod.min_rate_from_env() == (1000.0, 5.0)
