"""The transformers backend: tiny GPT-2 and GPT-NeoX run by prestage's engine give transformers' greedy tokens,
and a GPT-2 checkpoint on disk loads through prestage's weight loader (docs/vllm-rules.md, M-04)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from prestage.stages.launch.engine import Engine
from prestage.stages.launch.hf_backend import TransformersForCausalLM
from prestage.stages.launch.sampling import SamplingParams
from prestage.stages.launch.weight_loading import load_checkpoint
from tests.support.records import weights_record

PROMPTS = [[3, 17, 99, 4, 250, 8, 61], [42, 7], [5, 200, 13, 77, 77, 1, 190, 33, 12, 9, 140, 2, 6]]


class _IdsTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def _config(kind: str):
    import transformers

    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=256,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=128,
            initializer_range=0.2,
            bos_token_id=None,
            eos_token_id=None,
        )
    return transformers.GPTNeoXConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox"])
def test_M04_launch_transformers_backend_greedy_parity(kind):
    import transformers

    cfg = _config(kind)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ours = TransformersForCausalLM(cfg, torch.float32, "cpu")
    loaded = ours.load_weights(hf.state_dict().items())
    assert loaded == {n for n, _ in ours.named_parameters()} and ours.unused_weights == []
    engine = Engine(ours, _IdsTokenizer(), [], "cpu", torch.float32, 64, 4, 4 * 64)
    out = engine.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0.0))
    for p, o in zip(PROMPTS, out, strict=True):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([p]),
                do_sample=False,
                max_new_tokens=32,
                pad_token_id=0,
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
            )[0, len(p) :].tolist()
        assert o["token_ids"] == ref


def test_launch_transformers_backend_loads_gpt2_checkpoint(tmp_path):
    """GPT-2 written by save_pretrained (tied head left out of the file) -> our loader -> same greedy tokens."""
    import transformers

    from tests.support.checkpoints import build_checkpoint

    folder = build_checkpoint(tmp_path / "gpt2", arch="gpt2", with_tokenizer=False)
    cfg = transformers.AutoConfig.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ours = TransformersForCausalLM(cfg, torch.float32, "cpu")
    data = (folder / "model.safetensors").read_bytes()
    outputs = {
        "format": "safetensors",
        "files": [
            {
                "path": "model.safetensors",
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "kind": "safetensors",
            }
        ],
    }
    stats = load_checkpoint(ours, weights_record(outputs), folder, tmp_path, "cpu", verify_hashes=True)
    assert stats.tensors > 0
    engine = Engine(ours, _IdsTokenizer(), [], "cpu", torch.float32, 64, 2, 2 * 64)
    prompt = [11, 500, 3, 1000, 42]
    out = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=16,
            min_new_tokens=16,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )[0, len(prompt) :].tolist()
    assert out["token_ids"] == ref
