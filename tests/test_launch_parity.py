"""Parity of the native decoder and the engine with transformers, on tiny random models (CPU, float32).

Each native architecture (llama; mistral with a sliding window; qwen2 with q/k/v bias, tied embeddings and a
per-layer sliding window; qwen3 with q/k norm) with default RoPE, and qwen2 (the one with the most features)
through every RoPE type (linear, dynamic, yarn, llama3, longrope): our logits for a batch of prompts of
different lengths match transformers' (each prompt run alone) within 1e-4 max abs; 32 greedy tokens equal
`model.generate(do_sample=False)`; a batch gives the same tokens as each prompt alone. The dynamic and longrope
cases use short original lengths so generation crosses them. One GPU test (bf16, Qwen2-0.5B shape) runs only
where CUDA exists.
"""

from __future__ import annotations

import pytest
import torch

from prestage.stages.launch.engine import Engine
from prestage.stages.launch.models.decoder import DecoderArgs, DecoderForCausalLM
from prestage.stages.launch.rope import inv_freq_and_scaling
from prestage.stages.launch.sampling import SamplingParams

TOL = 1e-4
NEW_TOKENS = 32
PROMPTS = [[3, 17, 99, 4, 250, 8, 61], [42, 7], [5, 200, 13, 77, 77, 1, 190, 33, 12, 9, 140, 2, 6], [128]]

ROPES = {
    "default": ({}, 256),
    "linear": ({"rope_type": "linear", "factor": 2.0}, 256),
    # max_position_embeddings 24: prompt + 32 tokens outgrows it, so the NTK base grows during generation
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, 24),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 256),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        256,
    ),
    # original 20 < 13 + 32: the long factors take over during generation
    "longrope": (
        {
            "rope_type": "longrope",
            "original_max_position_embeddings": 20,
            "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 2.5],
            "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
        },
        64,
    ),
}


class _IdsTokenizer:
    """Decodes ids as text "i j k" (the engine needs a tokenizer; these tests compare token ids)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def tiny_hf_model(arch: str, rope: str, dtype=torch.float32):
    import transformers

    rope_params, max_pos = ROPES[rope]
    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        initializer_range=0.2,
        rope_parameters={"rope_theta": 10000.0, **rope_params},
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=6)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(
            **common, tie_word_embeddings=True, use_sliding_window=True, sliding_window=5, max_window_layers=1
        )
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=16)
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    return model


def native_from(hf_model, dtype=torch.float32, device="cpu") -> DecoderForCausalLM:
    model = DecoderForCausalLM(DecoderArgs.from_hf_config(hf_model.config), dtype=dtype, device=device)
    loaded = model.load_weights(hf_model.state_dict().items())
    assert loaded == {n for n, _ in model.named_parameters()}
    assert model.unused_weights == []
    return model


ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
# RoPE code is shared by every architecture: the full RoPE sweep on one architecture covers it.
CASES = [(arch, "default") for arch in ARCHS] + [("qwen2", rope) for rope in ROPES if rope != "default"]


@pytest.mark.parametrize("arch,rope", CASES, ids=[f"{a}-{r}" for a, r in CASES])
def test_launch_native_parity(arch, rope):
    hf = tiny_hf_model(arch, rope)
    ours = native_from(hf)
    engine = Engine(
        ours, _IdsTokenizer(), [], "cpu", torch.float32, max_model_len=64, max_num_seqs=8, kv_cache_tokens=8 * 64
    )
    # logits: one right-padded batch through our model vs each prompt alone through transformers
    B, T = len(PROMPTS), max(map(len, PROMPTS))
    ids = torch.zeros(B, T, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        ids[i, : len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in PROMPTS])
    with torch.no_grad():
        hidden = ours(ids, torch.arange(T)[None].expand(B, T), lengths, 0, T)  # [B, T, hidden]
        logits = ours.compute_logits(hidden)  # [B, T, V]
        worst = 0.0
        for i, p in enumerate(PROMPTS):
            ref = hf(torch.tensor([p])).logits[0]  # [len, V]
            worst = max(worst, (ref - logits[i, : len(p)]).abs().max().item())
    print(f"{arch}/{rope}: max abs logit diff {worst:.2e}")
    assert worst < TOL

    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    batch = engine.generate(PROMPTS, greedy)
    for p, out in zip(PROMPTS, batch, strict=True):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([p]),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
            )[0, len(p) :].tolist()
        assert out["token_ids"] == ref, f"{arch}/{rope} prompt {p}"
        assert out["finish_reason"] == "length"
    alone = [engine.generate([p], greedy)[0]["token_ids"] for p in PROMPTS]
    assert alone == [o["token_ids"] for o in batch]


def test_launch_rope_inv_freq_matches_transformers():
    """Our inverse frequencies and attention scaling equal transformers' ROPE_INIT_FUNCTIONS for each type,
    including the length-dependent ones past their original length."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for rope, (params, max_pos) in ROPES.items():
        if rope == "default":
            continue
        cfg = transformers.LlamaConfig(
            hidden_size=64,
            num_attention_heads=4,
            max_position_embeddings=max_pos,
            rope_parameters={"rope_theta": 10000.0, **params},
        )
        spec = DecoderArgs.from_hf_config(cfg).rope
        for seq_len in (None, max_pos + 40):
            ref, ref_scale = ROPE_INIT_FUNCTIONS[rope](cfg, "cpu", seq_len=seq_len)
            ours, scale = inv_freq_and_scaling(spec, 16, max_pos, seq_len=seq_len)
            torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0), (rope, seq_len)
            assert scale == pytest.approx(ref_scale), (rope, seq_len)


def test_launch_seeded_sampling_same_alone_and_in_batch():
    hf = tiny_hf_model("qwen2", "default")
    engine = Engine(native_from(hf), _IdsTokenizer(), [], "cpu", torch.float32, 64, 8, 8 * 64)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=7)
    batch = engine.generate(PROMPTS, params)
    alone = engine.generate(PROMPTS[:1], params)
    assert alone[0]["token_ids"] == batch[0]["token_ids"]
    greedy = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=12, temperature=0.0))
    other_seed = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=12, temperature=0.9, top_k=50, seed=8))
    assert {
        tuple(alone[0]["token_ids"]),
        tuple(greedy[0]["token_ids"]),
        tuple(other_seed[0]["token_ids"]),
    }.__len__() == 3  # sampling is really random, and the seed really decides it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_launch_gpu_bf16_parity_qwen2_05b_shape():
    """bf16 on GPU, Qwen2-0.5B shape (random weights): max abs logit diff within 2e-2 x the logit range,
    and identical greedy tokens for 16 steps."""
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        initializer_range=0.05,
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ours = native_from(hf, dtype=torch.bfloat16, device="cuda")
    engine = Engine(ours, _IdsTokenizer(), [], "cuda", torch.bfloat16, 512, 4, 4 * 512)
    prompt = [151, 9000, 42, 1234, 77, 5]
    with torch.no_grad():
        ref_logits = hf(torch.tensor([prompt], device="cuda")).logits[0, -1].float()
        got = ours.prefill(torch.tensor([prompt], device="cuda"), torch.tensor([len(prompt)], device="cuda"), 0)
        diff = (ref_logits - got[0].float()).abs().max().item()
        span = (ref_logits.max() - ref_logits.min()).item()
        print(f"bf16 max abs logit diff {diff:.3e} (logit range {span:.2f})")
        assert diff <= 2e-2 * span
        ref = hf.generate(torch.tensor([prompt], device="cuda"), do_sample=False, max_new_tokens=16)[0, 6:].tolist()
    out = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0))[0]["token_ids"]
    assert out == ref
