"""Which engine runs a run: a model only vLLM runs is staged, refused by prestage's engine before anything
loads (naming --engine vllm), and handed off to vLLM; a missing vLLM is one `unsupported` line.

No vLLM is needed here (tests/vllm/ runs it): a tiny ChatGLM folder (config.json as chatglm3, the test
tokenizer, one small safetensors file) goes through every stage.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from prestage.stages.errors import CODE

CARDS = Path(__file__).parent / "data" / "configs"


@pytest.fixture(scope="module")
def chatglm_folder(tmp_path_factory) -> Path:
    import torch
    from safetensors.torch import save_file

    from tests.support.tokenizer import train_bpe_tokenizer

    d = tmp_path_factory.mktemp("glm") / "tiny-chatglm"
    d.mkdir()
    cfg = json.loads((CARDS / "chatglm3-6b.json").read_text())
    cfg.update(
        num_layers=1,
        hidden_size=64,
        ffn_hidden_size=128,
        kv_channels=16,
        num_attention_heads=4,
        padded_vocab_size=1024,
        seq_length=512,
    )
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({"transformer.embedding.word_embeddings.weight": torch.zeros(1024, 64)}, str(d / "model.safetensors"))
    train_bpe_tokenizer(1024).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def glm_run(chatglm_folder, tmp_path_factory):
    import subprocess
    import sys

    arts = tmp_path_factory.mktemp("arts")
    cmd = [sys.executable, "-m", "prestage", "--artifacts", str(arts), "--run", "g", "run", str(chatglm_folder)]
    done = subprocess.run([*cmd, "--to", "fetch-weights"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "prestage's engine has no ChatGLMModel" in done.stderr
    return arts


def test_prestage_engine_refuses_before_loading_and_names_vllm(glm_run, prestage):
    r = prestage(["--artifacts", glm_run, "launch", "g", "--prompt", "hi"])
    assert r.rc == CODE["unsupported"], r
    lines = r.stderr.strip().splitlines()
    assert "prestage's engine has no ChatGLMModel; use --engine vllm" in lines[-1], r.stderr
    assert "Traceback" not in r.stderr and "weights" not in lines[-1]
    r = prestage(["--artifacts", glm_run, "serve", "g", "--port", "0"])
    assert r.rc == CODE["unsupported"] and "use --engine vllm" in r.stderr, r


def test_handoff_prints_the_vllm_command(glm_run, chatglm_folder, prestage):
    r = prestage(
        [
            "--artifacts",
            glm_run,
            "handoff",
            "g",
            "-tp",
            "8",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--master-addr",
            "10.0.0.1",
            "--headless",
            "--",
            "--enable-prefix-caching",
        ]
    )
    assert r.rc == 0, r
    words = shlex.split(r.stdout.strip())
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-") and w.split("=")[0].isupper())
    argv = words[len(env) :]
    assert argv[1:3] == ["serve", str(chatglm_folder)]
    opts = {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}
    assert opts["--tokenizer"] == str(glm_run / "g" / "tokenizer")
    assert opts["--dtype"] == "float16" and opts["--max-model-len"] == "512"
    assert opts["--load-format"] == "safetensors" and opts["--tokenizer-mode"] == "hf"
    assert opts["--served-model-name"] == str(chatglm_folder) and opts["--generation-config"] == "auto"
    assert opts["--tensor-parallel-size"] == "8" and opts["--nnodes"] == "2" and opts["--master-addr"] == "10.0.0.1"
    assert "--headless" in argv and argv[-1] == "--enable-prefix-caching"
    assert "--trust-remote-code" not in argv  # not recorded: vLLM has the config class
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1" and env["DO_NOT_TRACK"] == "1"
    assert "HF_HUB_CACHE" in env
    j = prestage(["--artifacts", glm_run, "handoff", "g", "--format", "json"])
    doc = json.loads(j.stdout)
    assert shlex.split(doc["shell"])[len(doc["env"]) :] == doc["argv"]
    assert doc["symbolic"]["args"]["tokenizer"] == "${PRESTAGE_RUN}/tokenizer"


def test_missing_vllm_is_one_unsupported_line(glm_run, prestage, tmp_path):
    import os

    env = dict(os.environ, PATH="/usr/bin:/bin")
    env.pop("PRESTAGE_VLLM", None)
    r = prestage(["--artifacts", glm_run, "launch", "g", "--engine", "vllm", "--prompt", "hi"], env=env)
    assert r.rc == CODE["unsupported"], r
    line = r.stderr.strip().splitlines()[-1]
    assert "vLLM is not installed" in line and "pip install vllm" in line, r.stderr
    r = prestage(["--artifacts", glm_run, "serve", "g", "--engine", "vllm", "--vllm", tmp_path / "nope"], env=env)
    assert r.rc == CODE["unsupported"] and "--vllm" in r.stderr and "nope" in r.stderr, r
    r = prestage(["--artifacts", glm_run, "launch", "g", "--engine", "tgi"], env=env)
    assert r.rc == CODE["usage"] and "--engine 'tgi'" in r.stderr, r
