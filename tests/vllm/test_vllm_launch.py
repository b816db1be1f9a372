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


@pytest.fixture(scope="module")
def native(staged):
    """prestage's own engine on the same prompts: its completions."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "prestage", "--artifacts", str(staged), "launch", "w", "--max-tokens", "16"]
    args += ["--generation-config", "vllm", "--json"]
    for p in PROMPTS:
        args += ["--prompt", p]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["completions"]


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


def test_vllm_launch_equals_prestage_and_transformers_offline(staged, native, wide_model, prestage, tmp_path):
    log = tmp_path / "net.log"
    env = vllm_env(PYTHONPATH=str(NETGUARD), PRESTAGE_NETGUARD_LOG=str(log))
    r = _launch(prestage, staged, "--engine", "vllm", "--vllm", VLLM_PY, "--device", "cpu", env=env)
    assert r.rc == 0, r
    rec = read(manifest_path(staged / "w", "launch")).outputs
    got = [c["token_ids"] for c in json.loads(r.stdout)["completions"]]
    ours = [c["token_ids"] for c in native]
    expected = _transformers_tokens(wide_model)
    assert all(len(t) == 16 for t in got) and any(len(set(t)) > 4 for t in got)  # not one repeated token
    assert got == expected, "vLLM's greedy tokens differ from transformers'"
    assert ours == expected, "prestage's greedy tokens differ from transformers'"

    assert rec["engine"]["kind"] == "vllm" and rec["device"] == "cpu" and rec["dtype"] == "float32"
    assert rec["vllm"]["version"] == "0.32.0" and rec["kv_cache_tokens"] > 0  # from vLLM's engine
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


CLIENT = """
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key="none", max_retries=0, timeout=120)
models = [m.id for m in client.models.list().data]
out = client.completions.create(model=sys.argv[2], prompt=json.loads(sys.argv[3]), max_tokens=16, temperature=0)
print(json.dumps({"models": models, "texts": [c.text for c in sorted(out.choices, key=lambda c: c.index)]}))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_engine_vllm_answers_the_openai_client(staged, native, tmp_path):
    """`prestage serve RUN --engine vllm` execs `vllm serve` with the run's decisions; the real openai client
    (from vLLM's environment) gets the completions prestage's own launch gives."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    cmd = [sys.executable, "-m", "prestage", "--artifacts", str(staged), "serve", "w", "--engine", "vllm"]
    cmd += ["--vllm", str(VLLM_PY), "--device", "cpu", "--port", str(port), "--generation-config", "vllm"]
    cmd += ["--", "--enforce-eager"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=vllm_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
                break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail("vllm serve did not come up within 400 s: " + (tmp_path / "serve.log").read_text()[-2000:])
        name = read(manifest_path(staged / "w", "resolve")).outputs["model"]
        done = subprocess.run(
            [str(VLLM_PY), "-c", CLIENT, f"http://127.0.0.1:{port}/v1", name, json.dumps(PROMPTS)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server this test started, and its engine processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
    assert answer["models"] == [name]
    assert answer["texts"] == [c["text"] for c in native]
