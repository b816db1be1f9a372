"""bench/bench_gpu.py's harness (the GPU figures need a CUDA machine; here: its checkpoint, its skip, and a
smoke run of every worker on CPU with a tiny shape). Checks what it writes, not how fast anything is."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bench import bench_gpu
from bench.common import ROOT


@pytest.mark.parametrize("config", [bench_gpu.QWEN2_05B, bench_gpu.QWEN2_7B], ids=["0.5b", "7b"])
def test_the_checkpoint_has_the_tensors_transformers_saves(config):
    """The random checkpoint's names and shapes are those of transformers' own Qwen2 of that config (a missing
    or misnamed tensor would load as random initialisation there, and the baseline would be wrong)."""
    import transformers

    small = {**config, "num_hidden_layers": 2}
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**small))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if small["tie_word_embeddings"]:
        expected.pop("lm_head.weight")
    assert bench_gpu.hf_names(small) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the bench would run")
def test_without_cuda_the_bench_says_why_and_writes_it(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run(
        [sys.executable, "-m", "bench.bench_gpu", "--out", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "bench-gpu: skipped: no CUDA device" in r.stdout
    assert json.loads(out.read_text())["skipped"].startswith("no CUDA device")


def test_the_smoke_run_measures_both_engines(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run(
        [sys.executable, "-m", "bench.bench_gpu", "--smoke", "--out", str(out), "--scratch", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    row = json.loads(out.read_text())["models"]["tiny"]
    keys = {"start_to_first_token_s", "load_gb_s_cold", "load_gb_s_warm", "decode_tok_s_b1", "decode_tok_s_b2"}
    for engine in ("prestage", "transformers"):
        assert keys <= set(row[engine]), engine
        assert all(row[engine][k] > 0 for k in keys if k.startswith(("decode", "start"))), row[engine]
    assert row["prestage"]["cuda_graphs"] is False and row["checkpoint_bytes"] > 0
