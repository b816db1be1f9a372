"""Shared pytest fixtures: tiny real checkpoints, a local Hugging Face hub, HF env isolation, the CLI runner.

Fixtures (see each docstring):
    checkpoint_dirs  (session)  {"single"|"sharded"|"bin": Path} tiny Qwen2 checkpoints built by transformers
    hub_session      (session)  a started LocalHub with the test-org/* repos committed
    hub              (function) the same hub, with test hooks and counters reset around each test
    hf_env           (function) env dict pointing HF clients at the hub with a fresh cache; applied to os.environ
    artifacts_dir    (function) tmp_path / "artifacts", the conventional --artifacts folder
    prestage         (function) run the prestage CLI in-process (tests.support.cli.run_cli) -> CliResult

Safety net: at import this module points HF_ENDPOINT at a closed loopback port and HF_HOME at a temp
folder, so no test can reach huggingface.co or read a real token or cache by accident; XDG_CACHE_HOME (where the
CPU kernels are compiled to) points into the same temp folder.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# ---- process-wide safety net: set before anything imports huggingface_hub (it reads env at import) ----
_SAFE_HOME = tempfile.mkdtemp(prefix="prestage-test-hfhome-")
atexit.register(shutil.rmtree, _SAFE_HOME, True)
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"  # discard port: refused at once, never the internet
os.environ["HF_HOME"] = _SAFE_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_SAFE_HOME, "hub")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["DISABLE_SAFETENSORS_CONVERSION"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["XDG_CACHE_HOME"] = os.path.join(_SAFE_HOME, "xdg-cache")  # where the CPU kernels are compiled to
for _var in (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HUGGINGFACE_HUB_CACHE",
    "TRANSFORMERS_CACHE",
    "HF_ASSETS_CACHE",
    "HF_MODULES_CACHE",
    "HUGGINGFACE_CO_STAGING",
):
    os.environ.pop(_var, None)

from tests.support.hub_server import GATED_TOKEN, LocalHub  # noqa: E402

TEST_REPOS = (
    "test-org/tiny-single",
    "test-org/tiny-sharded",
    "test-org/tiny-bin",
    "test-org/gated",
    "test-org/private",
    "test-org/no-config",
)


@pytest.fixture(scope="session")
def checkpoint_dirs(tmp_path_factory) -> dict[str, Path]:
    """{"single", "sharded", "bin"} -> folder holding that layout of the tiny Qwen2 checkpoint (seed 0).

    Built once per session. Treat as read-only: copy a folder before changing it.
    """
    from tests.support.checkpoints import LAYOUTS, build_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {layout: build_checkpoint(root / layout, layout=layout) for layout in LAYOUTS}


def seed_test_repos(hub: LocalHub, checkpoint_dirs: dict[str, Path]) -> dict[str, str]:
    """Commit the standard test repos; return {repo_id: main sha}.

    test-org/tiny-{single,sharded,bin}: the three layouts (tiny-single also has tag "v1.0");
    test-org/gated (gated, GATED_TOKEN granted) and test-org/private (private, GATED_TOKEN granted): the
    single layout; test-org/no-config: the single layout without config.json.
    """
    shas = {}
    for layout in ("single", "sharded", "bin"):
        shas[f"test-org/tiny-{layout}"] = hub.commit(
            f"test-org/tiny-{layout}", checkpoint_dirs[layout], message=f"tiny qwen2 ({layout})"
        )
    hub.tag("test-org/tiny-single", "v1.0")
    hub.create_repo("test-org/gated", gated=True)
    hub.allow_token("test-org/gated", GATED_TOKEN)
    shas["test-org/gated"] = hub.commit("test-org/gated", checkpoint_dirs["single"], message="gated tiny")
    hub.create_repo("test-org/private", private=True)
    hub.allow_token("test-org/private", GATED_TOKEN)
    shas["test-org/private"] = hub.commit("test-org/private", checkpoint_dirs["single"], message="private tiny")
    no_config = {p.name: p for p in sorted(checkpoint_dirs["single"].iterdir()) if p.name != "config.json"}
    shas["test-org/no-config"] = hub.commit("test-org/no-config", no_config, message="no config")
    return shas


@pytest.fixture(scope="session")
def hub_session(tmp_path_factory, checkpoint_dirs):
    """A started LocalHub (session-wide) with TEST_REPOS committed. Prefer `hub` in tests."""
    hub = LocalHub(tmp_path_factory.mktemp("hub-storage"))
    hub.seeded = seed_test_repos(hub, checkpoint_dirs)
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture
def hub(hub_session):
    """The session's LocalHub with throttle/corrupt/fail_next/page size and counters reset before and after."""
    hub_session.reset_hooks()
    yield hub_session
    hub_session.reset_hooks()


def _patch_hf_modules(monkeypatch, env: dict[str, str]) -> None:
    """Point already-imported huggingface_hub / transformers module constants at `env` (they read env at import)."""
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.hf_api as hf_api_mod
        from huggingface_hub import constants

        home = env["HF_HOME"]
        values = {
            "ENDPOINT": env["HF_ENDPOINT"],
            "HUGGINGFACE_CO_URL_TEMPLATE": env["HF_ENDPOINT"] + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HOME": home,
            "HF_HUB_CACHE": env["HF_HUB_CACHE"],
            "HUGGINGFACE_HUB_CACHE": env["HF_HUB_CACHE"],
            "HF_ASSETS_CACHE": os.path.join(home, "assets"),
            "HF_TOKEN_PATH": os.path.join(home, "token"),
            "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_DISABLE_XET": True,
        }
        for name, value in values.items():
            if hasattr(constants, name):
                monkeypatch.setattr(constants, name, value)
        monkeypatch.setattr(hf_api_mod.api, "endpoint", env["HF_ENDPOINT"])
    if "transformers.utils.hub" in sys.modules:
        import transformers.utils.hub as tf_hub

        monkeypatch.setattr(tf_hub, "_hf_api", None)  # cached HfApi keeps the endpoint it was made with


@pytest.fixture
def hf_env(tmp_path, monkeypatch, hub) -> dict[str, str]:
    """Env for HF clients talking to `hub` with a fresh cache; also applied to os.environ (and to the
    module constants of an already-imported huggingface_hub). Returns the full env dict for subprocesses.

    Keys set: HF_ENDPOINT=hub.url, HF_HOME=tmp/hf_home, HF_HUB_CACHE=tmp/hf_cache, HF_HUB_DISABLE_TELEMETRY=1,
    DISABLE_SAFETENSORS_CONVERSION=1, HF_HUB_DISABLE_XET=1; HF_TOKEN and HF_HUB_OFFLINE removed.
    """
    home, cache = tmp_path / "hf_home", tmp_path / "hf_cache"
    home.mkdir()
    cache.mkdir()
    updates = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DISABLE_SAFETENSORS_CONVERSION": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for key, value in updates.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    env = dict(os.environ)
    _patch_hf_modules(monkeypatch, env)
    return env


@pytest.fixture
def artifacts_dir(tmp_path) -> Path:
    """tmp_path / "artifacts": pass it as `--artifacts` to the CLI."""
    return tmp_path / "artifacts"


@pytest.fixture
def prestage():
    """Callable `prestage(args, env=None, cwd=None) -> CliResult`: the CLI run in-process by
    tests.support.cli.run_cli. `args` is a list (Paths allowed) or a shell-like string; env is a whole
    environment (default os.environ, so hf_env applies), applied for the call and restored after it."""
    from tests.support.cli import run_cli

    return run_cli
