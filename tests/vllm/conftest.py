"""vLLM as the oracle: tests that run vLLM's own code (the CPU build in .venv-vllm, `make vllm-venv`).

Every test here is marked `vllm` and skipped, with the reason printed, when .venv-vllm is absent, so
`make test` never needs vLLM; `make test-vllm` runs them. vLLM starts are slow on 2 cores (20-90 s each):
each module starts it at most once or twice.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_PY = Path(os.environ.get("PRESTAGE_TEST_VLLM_PY") or REPO / ".venv-vllm" / "bin" / "python")
ORACLE = Path(__file__).with_name("oracle.py")
NETGUARD = Path(__file__).with_name("netguard")
VLLM_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
PROMPTS = ["Hello, my name is", "The capital of France", "1 2 3 4"]


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vllm)
            if not VLLM_PY.exists():
                item.add_marker(pytest.mark.skip(reason=f"no vLLM Python at {VLLM_PY}: run `make vllm-venv` first"))


def vllm_env(**extra) -> dict:
    env = dict(os.environ, **VLLM_ENV, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    env.update(extra)
    return env


def oracle(*args: str, timeout: float = 600):
    """Run tests/vllm/oracle.py in the vLLM Python; its JSON answer."""
    done = subprocess.run(
        [str(VLLM_PY), str(ORACLE), *args], capture_output=True, text=True, timeout=timeout, env=vllm_env()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def wide_model(tmp_path_factory) -> Path:
    """The head_dim-64 tiny Qwen2 (tests.support.checkpoints, wide=True): vLLM's CPU attention runs it."""
    from tests.support.checkpoints import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("wide") / "tiny-wide", arch="qwen2", wide=True)
