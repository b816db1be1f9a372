"""The engine's bookkeeping: stop conditions, incremental text, slots reused by waiting prompts, KV sizing,
sampling parameters. A tiny random Qwen2 (vocab 1024) with the trained test BPE tokenizer.
Case labels in test names (T05 is T-05) are defined in docs/vllm-rules.md."""

from __future__ import annotations

import pytest
import torch

from prestage.stages.errors import ResourceError, UsageError
from prestage.stages.launch.detokenizer import IncrementalDetokenizer
from prestage.stages.launch.engine import Engine, plan_kv_cache
from prestage.stages.launch.models.decoder import DecoderArgs, DecoderForCausalLM
from prestage.stages.launch.sampling import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer():
    from tests.support.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(1024)


def tiny_pair(seed: int):
    """(transformers Qwen2 model, our decoder with the same weights), tiny and random."""
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    ours = DecoderForCausalLM(DecoderArgs.from_hf_config(cfg), dtype=torch.float32)
    ours.load_weights(hf.state_dict().items())
    return hf, ours


@pytest.fixture(scope="module")
def model():
    return tiny_pair(1)[1]


def make_engine(model, tokenizer, eos=(), max_model_len=64, max_num_seqs=4):
    return Engine(
        model, tokenizer, list(eos), "cpu", torch.float32, max_model_len, max_num_seqs, max_num_seqs * max_model_len
    )


def test_launch_detokenizer_matches_full_decode(tokenizer):
    text = "def héllo(wörld):\n    return '日本語 — ok' + str(42)  # ünïcode ✓"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], True)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    gen = torch.Generator().manual_seed(0)
    prompt = tokenizer.encode("print(", add_special_tokens=False)  # ends on a character boundary
    for _ in range(5):  # random ids: byte pieces that never complete a character included
        out = torch.randint(0, 1024, (30,), generator=gen).tolist()
        detok = IncrementalDetokenizer(tokenizer, prompt, True)
        assert "".join([detok.add(i) for i in out] + [detok.flush()]) == tokenizer.decode(out, skip_special_tokens=True)


def test_launch_text_is_the_decoded_tokens(model, tokenizer):
    engine = make_engine(model, tokenizer)
    prompts = [tokenizer.encode(p) for p in ("import os", "def main():\n", "x")]
    for out in engine.generate(prompts, SamplingParams(max_tokens=20, **GREEDY)):
        assert out["finish_reason"] == "length" and len(out["token_ids"]) == 20
        full = tokenizer.decode(out["token_ids"], skip_special_tokens=True)
        # as vLLM: a trailing incomplete UTF-8 character (and what was held back with it) is not emitted
        assert full.startswith(out["text"])
        assert full == out["text"] or (full.endswith("\ufffd") and len(full) - len(out["text"]) <= 8), (out, full)


def test_launch_stop_string_cuts_text(model, tokenizer):
    engine = make_engine(model, tokenizer)
    prompt = tokenizer.encode("import os")
    full = engine.generate([prompt], SamplingParams(max_tokens=24, **GREEDY))[0]
    stop = full["text"][len(full["text"]) // 2 :][:3]
    assert stop.strip(), full["text"]
    out = engine.generate([prompt], SamplingParams(max_tokens=24, stop=[stop], **GREEDY))[0]
    assert out["finish_reason"] == "stop"
    assert out["text"] == full["text"][: full["text"].find(stop)]
    assert full["token_ids"][: len(out["token_ids"])] == out["token_ids"] and len(out["token_ids"]) < 24


def test_launch_eos_stops_and_is_kept_in_token_ids(model, tokenizer):
    prompt = tokenizer.encode("import os")
    free = make_engine(model, tokenizer).generate([prompt], SamplingParams(max_tokens=12, **GREEDY))[0]
    eos = free["token_ids"][4]
    cut = free["token_ids"].index(eos)
    out = make_engine(model, tokenizer, eos=[eos]).generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))[0]
    assert out["finish_reason"] == "stop" and out["token_ids"] == free["token_ids"][: cut + 1]
    assert out["text"] == tokenizer.decode(free["token_ids"][:cut], skip_special_tokens=True)
    ignored = make_engine(model, tokenizer, eos=[eos]).generate([prompt], SamplingParams(max_tokens=12, **GREEDY))[0]
    assert ignored["token_ids"] == free["token_ids"]


def test_launch_max_model_len_ends_with_length(model, tokenizer):
    engine = make_engine(model, tokenizer, max_model_len=16)
    out = engine.generate([list(range(1, 14))], SamplingParams(max_tokens=10, **GREEDY))[0]
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 3  # 13 + 3 = 16
    with pytest.raises(UsageError, match="more than --max-model-len 16"):
        engine.generate([list(range(1, 17))], SamplingParams(max_tokens=1))
    with pytest.raises(UsageError, match="empty"):
        engine.generate([[]], SamplingParams(max_tokens=1))


def test_T05_launch_prompt_token_out_of_vocab(model, tokenizer):
    engine = make_engine(model, tokenizer)
    with pytest.raises(UsageError, match="token id 1024, outside the model's vocabulary of 1024"):
        engine.generate([[5, 1024]], SamplingParams(max_tokens=1))


def test_launch_more_prompts_than_slots_same_as_alone(model, tokenizer):
    """7 prompts through 3 slots: finished sequences free slots mid-run (rows move), waiting ones prefill."""
    engine = make_engine(model, tokenizer, max_num_seqs=3)
    texts = ["import os", "x = 1", "def f(a, b):", "class A:", "# comment", "while True:", "print('hi')"]
    prompts = [tokenizer.encode(t) for t in texts]
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (3, 17, 5, 9, 2, 14, 11)]
    batch = engine.generate(prompts, params)
    single = make_engine(model, tokenizer, max_num_seqs=1)
    alone = [single.generate([p], sp)[0] for p, sp in zip(prompts, params, strict=True)]
    assert [o["token_ids"] for o in batch] == [o["token_ids"] for o in alone]
    assert [len(o["token_ids"]) for o in batch] == [3, 17, 5, 9, 2, 14, 11]


def test_launch_sampling_top_k_1_is_greedy_and_seed_decides(model, tokenizer):
    engine = make_engine(model, tokenizer)
    prompt = [tokenizer.encode("import os")]
    greedy = engine.generate(prompt, SamplingParams(max_tokens=10, **GREEDY))[0]["token_ids"]
    top1 = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=1.5, top_k=1, ignore_eos=True))
    assert top1[0]["token_ids"] == greedy
    a = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True))
    b = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True))
    assert a[0]["token_ids"] == b[0]["token_ids"] != greedy


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"temperature": -1}, "--temperature"),
        ({"top_p": 0}, "--top-p"),
        ({"max_tokens": 0}, "--max-tokens"),
        ({"top_k": -2}, "--top-k"),
        ({"min_p": 1.5}, "--min-p"),
        ({"repetition_penalty": 0}, "--repetition"),
    ],
)
def test_launch_sampling_params_rejected(kwargs, flag):
    with pytest.raises(UsageError, match=flag):
        SamplingParams(**kwargs)


def test_launch_kv_plan_cpu_budget_and_resource_error(model):
    per_token = model.kv_bytes_per_token(torch.float32)
    assert per_token == 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head_dim x bytes
    assert plan_kv_cache(model, torch.device("cpu"), torch.float32, 64, 8) == 8 * 64
    budget_gib = per_token * 100 / 1024**3
    assert plan_kv_cache(model, torch.device("cpu"), torch.float32, 64, 8, cpu_kv_cache_space_gib=budget_gib) == 100
    with pytest.raises(ResourceError, match="--max-model-len 4096 needs 2.00 MiB") as e:
        plan_kv_cache(model, torch.device("cpu"), torch.float32, 4096, 8, cpu_kv_cache_space_gib=budget_gib)
    assert "VLLM_CPU_KVCACHE_SPACE" in str(e.value)


def test_launch_repetition_penalty_matches_transformers(tokenizer):
    """Greedy with repetition_penalty 1.3: the same 24 tokens as transformers' generate with the same penalty,
    and different tokens from no penalty (so the penalty is really applied)."""
    import transformers

    hf, ours = tiny_pair(3)
    engine = make_engine(ours, tokenizer)
    prompts = [tokenizer.encode("import os\nimport os\n"), tokenizer.encode("x = x + x")]
    penalized = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, repetition_penalty=1.3))
    plain = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))
    for ids, got in zip(prompts, penalized, strict=True):
        gen = transformers.GenerationConfig(
            do_sample=False, max_new_tokens=24, repetition_penalty=1.3, eos_token_id=None, pad_token_id=0
        )
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([ids]), generation_config=gen, attention_mask=torch.ones(1, len(ids), dtype=torch.long)
            )[0, len(ids) :].tolist()
        assert got["token_ids"] == ref
    assert [o["token_ids"] for o in penalized] != [o["token_ids"] for o in plain]


def test_launch_min_p_one_keeps_only_the_best_token(model, tokenizer):
    engine = make_engine(model, tokenizer)
    prompt = [tokenizer.encode("def main(")]
    greedy = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0))[0]["token_ids"]
    sampled = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=5.0, min_p=1.0, seed=7))
    assert sampled[0]["token_ids"] == greedy
    loose = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=5.0, min_p=0.0, seed=7))
    assert loose[0]["token_ids"] != greedy  # at temperature 5 without min-p the draw wanders


def test_launch_step_loop_joins_mid_run_and_matches_alone(model, tokenizer):
    """A request added while others decode joins the running batch at the next step; every result equals the
    same request alone, and slots come back to the table when the requests end."""
    engine = make_engine(model, tokenizer, max_num_seqs=4)
    prompts = [tokenizer.encode(t) for t in ("import os", "x = 1", "def f(a, b):")]
    sp = SamplingParams(max_tokens=12, **GREEDY)
    first = engine.add_request(prompts[0], sp)
    outs: dict[int, list] = {}
    for _ in range(4):
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    later = [engine.add_request(p, sp) for p in prompts[1:]]
    kinds = []
    while engine.has_unfinished():
        running_before = engine.num_running
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        kinds.append(running_before)
    assert max(kinds) == 3  # all three decoded together
    alone = make_engine(model, tokenizer, max_num_seqs=1)
    for rid, p in zip([first, *later], prompts, strict=True):
        assert outs[rid][-1].token_ids == alone.generate([p], sp)[0]["token_ids"]
        assert [t for o in outs[rid] for t in o.new_token_ids] == outs[rid][-1].token_ids
    assert engine.slots_in_use == 0 and engine.num_waiting == 0


def test_launch_abort_frees_the_slot_at_the_next_step(model, tokenizer):
    engine = make_engine(model, tokenizer, max_num_seqs=1)
    sp = SamplingParams(max_tokens=40, **GREEDY)
    rid = engine.add_request(tokenizer.encode("import os"), sp)
    engine.step()
    engine.step()
    waiting = engine.add_request(tokenizer.encode("x = 1"), SamplingParams(max_tokens=3, **GREEDY))
    assert engine.slots_in_use == 1 and engine.num_waiting == 1
    engine.abort(rid)
    outs = engine.step()  # frees the aborted slot, then the waiting request prefills into it
    assert [(o.request_id, o.finish_reason) for o in outs][0] == (rid, "abort")
    assert outs[1].request_id == waiting and len(outs[1].token_ids) == 1
    assert engine.slots_in_use == 1 and engine.scheduler.running[0].id == waiting
    gone = engine.add_request(tokenizer.encode("y"), sp)
    engine.abort(gone)  # aborted while waiting: reported once, never runs
    outs = engine.step()
    assert (gone, "abort") in [(o.request_id, o.finish_reason) for o in outs]
    while engine.has_unfinished():
        engine.step()
    assert engine.slots_in_use == 0 and not engine.requests


def test_launch_decode_attends_only_the_running_lengths(model, tokenizer):
    """On CPU each decode step's attention reads as many cache positions as the longest running sequence
    holds, not max_model_len; when the longest one ends the next step reads less."""
    engine = make_engine(model, tokenizer, max_model_len=64, max_num_seqs=2)
    long_p, short_p = list(range(1, 21)), list(range(1, 6))
    engine.add_request(long_p, SamplingParams(max_tokens=4, **GREEDY))
    engine.add_request(short_p, SamplingParams(max_tokens=12, **GREEDY))
    seen = []  # (positions the step's attention read, the longest running sequence's length before the step)
    while engine.has_unfinished():
        outs = [o for o in engine.step() if len(o.token_ids) > 1]  # decode steps
        if outs:
            longest = max(o.prompt_tokens + len(o.token_ids) - 1 for o in outs)
            seen.append((engine.runner.last_attend_len, longest))
    assert seen and all(att == longest for att, longest in seen)
    assert max(att for att, _ in seen) == 20 + 4 - 1  # the long prompt's last decode position + 1
    assert seen[-1][0] < 20  # after the long one ended, the short one's steps read only its own length
    assert max(att for att, _ in seen) < 64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_launch_cpu_prepacked_weights_match_dense(dtype):
    """bf16 and fp32 on CPU: the engine pre-packs the projections for oneDNN; logits stay those of the dense
    weights (within bf16 rounding, or fp32 accumulation order) and the greedy tokens are the same."""
    hf, dense = tiny_pair(5)
    dense = dense.to(dtype)
    packed = DecoderForCausalLM(dense.args, dtype=dtype)
    packed.load_weights(dense.state_dict().items())
    assert packed.prepack_for_cpu() and packed.model.layers[0].self_attn.qkv_proj.weight is None
    assert not DecoderForCausalLM(dense.args, dtype=torch.float16).prepack_for_cpu()  # float16 stays dense
    ids = torch.tensor([[5, 17, 300, 9, 41, 77]])
    for m in (dense, packed):
        m.allocate_kv_cache(1, 32, "cpu", dtype)
    with torch.inference_mode():
        a = dense.prefill(ids, torch.tensor([6]), 0).float()
        b = packed.prefill(ids, torch.tensor([6]), 0).float()
    tol = 0.05 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    tok = _IdTokenizer()
    sp = SamplingParams(max_tokens=10, **GREEDY)
    outs = [
        Engine(m, tok, [], "cpu", dtype, 32, 2, 64, prepack=False).generate([[5, 17, 300, 9]], sp)
        for m in (dense, packed)
    ]
    assert dense.model.layers[0].self_attn.qkv_proj.packed is None
    assert outs[0][0]["token_ids"] == outs[1][0]["token_ids"]


class _IdTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_launch_cpu_kv_cache_takes_memory_only_where_written():
    """On CPU the KV cache is zeros from an anonymous mapping: a 256 MiB cache costs the process almost nothing
    until sequences fill it, reads as zeros, and holds what is written."""
    import subprocess
    import sys

    script = """
import torch
from prestage.stages.launch.models.decoder import zeros_on_demand
def rss():
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmRSS:")) * 1024
before = rss()
cache = zeros_on_demand((4, 2, 8, 2, 4096, 64), torch.bfloat16)  # 4*2*8*2*4096*64*2 bytes = 256 MiB
assert cache.shape == (4, 2, 8, 2, 4096, 64) and cache.dtype == torch.bfloat16
assert float(cache[3, 1, 7, 1, 4095].abs().sum()) == 0.0
cache[0, 0, 0, 0, :16] = 1.5
assert float(cache[0, 0, 0, 0, 15, 63]) == 1.5 and float(cache[0, 0, 0, 0, 16, 0]) == 0.0
print(rss() - before)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    grew = int(r.stdout.split()[-1])
    assert grew < 16 * 1024**2, f"RSS grew by {grew / 1024**2:.0f} MiB for an untouched 256 MiB cache"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("rot", [64, 32], ids=["full", "partial"])
def test_launch_rotation_by_roll_is_rotate_half_bit_for_bit(dtype, rot):
    """The decoder rotates with x.roll(rot / 2) and a sin whose first half is negated, once per step: the result is
    the textbook x * cos + rotate_half(x) * sin (transformers' form, in the activations' dtype) bit for bit."""
    from prestage.stages.launch.rope import apply_rotary, rotation_tables

    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 5, 3, 64, generator=gen) * 4).to(dtype)  # [B, H, T, D]
    angles = torch.randn(2, 3, rot, generator=gen) * 50  # [B, T, rot] float32, as RotaryEmbedding gives
    cos32, sin32 = angles.cos(), angles.sin()
    cos, sin = cos32[:, None].to(dtype), sin32[:, None].to(dtype)  # [B, 1, T, rot]
    half = rot // 2
    x_rot = x[..., :rot]
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)  # rotate_half
    want = torch.cat((x_rot * cos + rotated * sin, x[..., rot:]), dim=-1)  # [B, H, T, D]
    got = apply_rotary(x, *rotation_tables(cos32, sin32, dtype))
    assert got.dtype == dtype and torch.equal(got, want)


def test_launch_cache_writes_land_where_indexing_puts_them():
    """CacheWrites (one index_copy_ into the flat cache per layer for the keys, one for the values) writes each
    row's keys and values at [slot, head, position], the same as indexing the 4-d cache by slot and position."""
    from prestage.stages.launch.models.decoder import CacheWrites

    gen = torch.Generator().manual_seed(4)
    B, T, Hkv, D, slots, S_max = 3, 2, 2, 8, 5, 16
    index = torch.tensor([4, 0, 2])  # not contiguous
    positions = torch.tensor([[3, 4], [0, 1], [14, 15]])  # [B, T]
    k = torch.randn(B, Hkv, T, D, generator=gen)  # as the decoder holds them
    v = torch.randn(B, T, Hkv, D, generator=gen)
    got = torch.zeros(3, 2, slots, Hkv, S_max, D)  # [L, 2, slots, Hkv, S_max, D]
    want = got.clone()
    CacheWrites(index, positions, tuple(got.shape))(got[1], k, v)
    rows = index[:, None].expand(B, T)  # [B, T]
    want[1, 0][rows, :, positions] = k.transpose(1, 2)
    want[1, 1][rows, :, positions] = v
    assert torch.equal(got, want) and got[0].abs().sum() == 0 and got[2].abs().sum() == 0


def test_launch_engine_process_asks_torch_for_huge_pages():
    """launch and serve import torch through torch_setup: PyTorch's THP_MEM_ALLOC_ENABLE is set before torch's
    first allocation (none of the modules the launch path imports first pulls torch in), so the packed weights
    are allocated on transparent huge pages; a value the user set is kept. For float32 on CPU
    (`huge_pages=False`) it is left unset: torch's default, no huge pages."""
    import subprocess
    import sys
    from pathlib import Path

    script = """
import os, sys
from prestage.stages.launch import completions, inference, stage  # what `prestage launch` imports first
assert 'torch' not in sys.modules, 'torch imported before torch_setup'
from prestage.stages.launch.torch_setup import import_torch
torch = import_torch()
packed = [torch.ops.mkldnn._reorder_linear_weight(torch.randn(4096, 1024, dtype=torch.bfloat16), 1) for _ in range(4)]
huge = next(int(x.split()[1]) for x in open('/proc/self/smaps_rollup') if x.startswith('AnonHugePages:'))
print(os.environ['THP_MEM_ALLOC_ENABLE'], huge * 1024)
"""
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    thp = mode.read_text().split("[")[1].split("]")[0] if mode.exists() else "never"
    env = {k: v for k, v in __import__("os").environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    setting, huge = r.stdout.split()
    assert setting == "1"
    if thp != "never":  # madvise asked for huge pages under the 32 MiB of packed weights: at least one is there
        assert int(huge) >= 2 * 1024**2, f"{int(huge)} bytes on huge pages (kernel THP mode {thp!r})"
    r = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "THP_MEM_ALLOC_ENABLE": "0"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "0"
    float32 = script.replace("import_torch()", "import_torch(huge_pages=False)").replace(
        "os.environ[", "os.environ.get("
    )
    float32 = float32.replace("'THP_MEM_ALLOC_ENABLE']", "'THP_MEM_ALLOC_ENABLE', 'unset')")
    r = subprocess.run([sys.executable, "-c", float32], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    setting, huge = r.stdout.split()
    assert setting == "unset"  # float32 on CPU: torch's default
    if thp == "madvise":  # nothing asked for huge pages, so none
        assert huge == "0", f"{huge} bytes on huge pages"


@pytest.mark.parametrize(
    "given, recorded, expected",
    [
        (None, "float32", "float32"),
        ("auto", "bfloat16", "bfloat16"),
        ("float", "bfloat16", "float32"),
        ("half", "float32", "float16"),
        ("FLOAT32", "bfloat16", "float32"),
        (" torch.bfloat16 ", "float32", "bfloat16"),
    ],
)
def test_launch_knows_the_cpu_dtype_before_importing_torch(given, recorded, expected):
    """launch decides huge pages (not for float32) before torch is imported, from --dtype (as configure reads it:
    aliases, case, a torch. prefix) or configure's CPU dtype: the same dtype pick_dtype then runs on CPU."""
    from types import SimpleNamespace

    from prestage.stages.launch import inference

    conf = SimpleNamespace(dtype=SimpleNamespace(cpu=recorded, gpu="bfloat16"))
    params = {} if given is None else {"dtype": given}
    requested = inference.requested_dtype(params)
    assert inference.cpu_dtype_name(conf, requested) == expected
    picked = inference.pick_dtype(conf, torch.device("cpu"), [], requested)
    assert picked == getattr(torch, expected)


def test_a_rope_type_the_engine_does_not_run_is_a_one_line_unsupported_error():
    """An unknown rope_type (configure passes what transformers only warns about) is refused by name, with the
    supported list and the fix, as `unsupported` (it was an internal ValueError)."""
    from prestage.stages.errors import UnsupportedError
    from prestage.stages.launch.rope import RotaryEmbedding, inv_freq_and_scaling

    bogus = {"rope_type": "bogus", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(UnsupportedError, match="rope_type 'bogus'.*--engine vllm"):
        RotaryEmbedding(bogus, 16, 128)
    with pytest.raises(UnsupportedError, match="longrope"):
        inv_freq_and_scaling(bogus, 16, 128)
