"""End to end on vLLM: `prestage launch RUN --engine vllm` against prestage's engine and transformers, the
hand-off command, and vLLM's launch offline (every non-loopback connection refused and logged).

One vLLM start in this module (the launch); the others are prestage's engine and transformers.
"""

from __future__ import annotations

import json
import shlex

import pytest

from prestage.stages.manifest import manifest_path, read
from tests.vllm.conftest import NETGUARD, PROMPTS, VLLM_PY, vllm_env


@pytest.fixture(scope="module")
def staged(wide_model, tmp_path_factory):
    """A run of the wide tiny model staged to fetch-weights in float32 (the dtype all three engines run)."""
    import subprocess
    import sys

    arts = tmp_path_factory.mktemp("arts")
    cmd = [sys.executable, "-m", "prestage", "--artifacts", str(arts), "--run", "w", "run", str(wide_model)]
    done = subprocess.run([*cmd, "--to", "fetch-weights", "--dtype", "float32"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return arts


def _launch(prestage, arts, *extra, env=None):
    # greedy: the tiny model's generation_config.json samples (temperature 0.7), so it is set aside
    args = ["--artifacts", arts, "launch", "w", "--max-tokens", "16", "--generation-config", "vllm", "--json"]
    for p in PROMPTS:
        args += ["--prompt", p]
    return prestage([*args, *extra], env=env, timeout=900)


def _transformers_tokens(model_dir) -> list[list[int]]:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        g = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        out.append(g[0, ids.shape[1] :].tolist())
    return out


def test_vllm_launch_equals_prestage_and_transformers_offline(staged, wide_model, prestage, tmp_path):
    log = tmp_path / "net.log"
    env = vllm_env(PYTHONPATH=str(NETGUARD), PRESTAGE_NETGUARD_LOG=str(log))
    r = _launch(prestage, staged, "--engine", "vllm", "--vllm", VLLM_PY, "--device", "cpu", env=env)
    assert r.rc == 0, r
    rec = read(manifest_path(staged / "w", "launch")).outputs  # before prestage's own launch replaces it
    ours = _launch(prestage, staged)
    assert ours.rc == 0, ours
    got = [c["token_ids"] for c in json.loads(r.stdout)["completions"]]
    native = [c["token_ids"] for c in json.loads(ours.stdout)["completions"]]
    expected = _transformers_tokens(wide_model)
    assert all(len(t) == 16 for t in got) and any(len(set(t)) > 4 for t in got)  # not one repeated token
    assert got == expected, "vLLM's greedy tokens differ from transformers'"
    assert native == expected, "prestage's greedy tokens differ from transformers'"

    assert rec["engine"]["kind"] == "vllm" and rec["device"] == "cpu" and rec["dtype"] == "float32"
    assert rec["vllm"]["version"] == "0.32.0"
    command = rec["vllm"]["command"]
    assert command[:2] == ["vllm", "serve"] and command[2].startswith("${PRESTAGE_RUN}/")
    assert "--served-model-name" in command and str(staged) not in " ".join(command)  # no absolute path
    assert rec["vllm"]["env"]["HF_HUB_OFFLINE"] == "1"
    # offline: no Python code in prestage, vLLM or its workers tried a non-loopback TCP connection
    attempts = log.read_text().splitlines() if log.exists() else []
    assert not [a for a in attempts if a.startswith("tcp")], attempts


def test_handoff_json_round_trips(staged, prestage):
    r = prestage(["--artifacts", staged, "handoff", "w", "--format", "json", "-tp", "4", "--", "--port", "9000"])
    assert r.rc == 0, r
    doc = json.loads(r.stdout)
    argv, env = doc["argv"], doc["env"]
    assert argv[1:3][0] == "serve" and shlex.split(doc["shell"]) == [f"{k}={v}" for k, v in sorted(env.items())] + argv
    i = argv.index("--tensor-parallel-size")
    assert argv[i + 1] == "4" and argv[-2:] == ["--port", "9000"]
    for flag in ("--tokenizer", "--dtype", "--max-model-len", "--load-format", "--tokenizer-mode"):
        assert flag in argv
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1" and env["DO_NOT_TRACK"] == "1"
    shell = prestage(["--artifacts", staged, "handoff", "w", "-tp", "4", "--", "--port", "9000"])
    assert shell.stdout.strip() == doc["shell"]
