"""Real tiny checkpoints written by transformers, and a large fake-weights checkpoint for benchmarks.

`build_checkpoint(out_dir, layout, arch, seed)` writes a deterministic tiny causal LM (vocab 1024 to match
the trained tokenizer in tests.support.tokenizer, hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV
heads) as a single `model.safetensors`, as sharded safetensors with an index, or as a `.bin`-only
checkpoint, with config.json, generation_config.json and the tokenizer files.

`wide=True` is the variant vLLM's CPU attention accepts (it refuses head_dim 16): hidden 128, intermediate 256,
2 heads and 1 KV head of head_dim 64, with larger initial weights (initializer_range 0.3) so that a greedy
continuation is not one repeated token and a comparison between engines can fail.

`build_large_checkpoint(out_dir, total_bytes, num_shards)` writes Llama-shaped bf16 safetensors shards
of uninitialised (or random) data plus index and config.json, fast, for download benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LAYOUTS = ("single", "sharded", "bin")
ARCHS = ("qwen2", "llama", "mistral", "qwen3", "gpt2")
TINY_VOCAB = 1024
# Shard size for layout="sharded": the fp32 tiny model (~0.8 MB) splits into several shards.
SHARD_SIZE = "300KB"


def _special_ids(tokenizer) -> dict[str, int]:
    return {
        "bos": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }


WIDE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)


def tiny_config(
    arch: str = "qwen2", config_overrides: dict[str, Any] | None = None, ids: dict | None = None, wide: bool = False
):
    """Return a transformers config for the tiny model of `arch` (see ARCHS), with overrides applied."""
    import transformers

    ids = ids or {"bos": TINY_VOCAB - 3, "eos": TINY_VOCAB - 1, "pad": TINY_VOCAB - 3}
    common = dict(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    decoder = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        **common,
    )
    if wide:
        if arch not in ("qwen2", "llama", "mistral"):
            raise ValueError(f"wide tiny models are qwen2, llama or mistral, not {arch!r}")
        decoder.update(WIDE, initializer_range=0.3)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**decoder)
    elif arch == "llama":
        cfg = transformers.LlamaConfig(**decoder)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**decoder, sliding_window=None)
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(**decoder, head_dim=16)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=TINY_VOCAB, n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=1024, **common
        )
    else:
        raise ValueError(f"unknown tiny arch {arch!r}: use one of {', '.join(ARCHS)}")
    for key, value in (config_overrides or {}).items():
        setattr(cfg, key, value)
    return cfg


def build_checkpoint(
    out_dir: str | Path,
    layout: str = "single",
    arch: str = "qwen2",
    seed: int = 0,
    with_tokenizer: bool = True,
    config_overrides: dict[str, Any] | None = None,
    dtype: str = "float32",
    wide: bool = False,
) -> Path:
    """Write a real, deterministic tiny checkpoint into `out_dir` and return its path.

    layout: "single" -> model.safetensors; "sharded" -> model-0000N-of-0000M.safetensors +
    model.safetensors.index.json; "bin" -> pytorch_model.bin (torch.save of the state dict) only.
    """
    import torch
    import transformers

    from tests.support.tokenizer import train_bpe_tokenizer

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_bpe_tokenizer(TINY_VOCAB)
    ids = _special_ids(tokenizer)
    config = tiny_config(arch, config_overrides, ids, wide=wide)
    config.architectures = [
        {
            "gpt2": "GPT2LMHeadModel",
            "qwen2": "Qwen2ForCausalLM",
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
        }[arch]
    ]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)  # float32 init, seeded
    model = model.to(getattr(torch, dtype)).eval()
    model.config.dtype = dtype
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=ids["bos"],
        eos_token_id=[ids["eos"], ids["bos"]],
        pad_token_id=ids["pad"],
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.05,
    )

    if layout == "bin":
        model.config.save_pretrained(out)
        model.generation_config.save_pretrained(out)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}  # name -> tensor
        torch.save(state, out / "pytorch_model.bin")
    else:
        max_shard = SHARD_SIZE if layout == "sharded" else "50GB"
        model.save_pretrained(out, max_shard_size=max_shard)
        if layout == "sharded" and not (out / "model.safetensors.index.json").exists():
            raise RuntimeError(f"transformers did not shard the tiny model at max_shard_size={max_shard}")
    for weights in out.glob("*.safetensors"):
        weights.chmod(0o644)  # transformers writes 0600; keep files readable like a real download
    if with_tokenizer:
        tokenizer.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------------------
# Large fake checkpoint for download benchmarks


def _large_shape(total_bytes: int) -> dict[str, int]:
    """Pick a Llama-like shape (bf16) whose parameter bytes come close to `total_bytes`."""
    candidates = (  # (vocab, hidden, intermediate, heads, kv_heads), largest first
        (32000, 4096, 11008, 32, 8),
        (32000, 2048, 5632, 32, 4),
        (32000, 1024, 2816, 16, 4),
        (32000, 512, 1408, 8, 2),
        (32000, 256, 704, 4, 2),
        (8192, 256, 704, 4, 2),
        (4096, 128, 352, 4, 2),
        (1024, 64, 128, 4, 2),
    )
    for vocab, hidden, inter, heads, kv in candidates:
        head_dim = hidden // heads
        per_layer = 2 * (2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden)
        embed = 2 * (2 * vocab * hidden) + 2 * hidden
        if embed + per_layer <= total_bytes or hidden == 64:
            layers = max(1, round((total_bytes - embed) / per_layer))
            return dict(vocab=vocab, hidden=hidden, inter=inter, heads=heads, kv=kv, layers=layers)
    raise AssertionError("unreachable: the last candidate always fits")


def _write_sparse_safetensors(path: Path, group, nbytes) -> None:
    """Write a valid safetensors file whose data section is a sparse hole (reads as zeros).

    safetensors has no API to write a header without materialising the tensors, and materialising
    2 GB costs ~10 s here; the format is an 8-byte little-endian header length, a JSON header
    (name -> dtype, shape, data_offsets relative to the data start) padded to 8 bytes, then the data.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in group:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes(shape)]}
        offset += nbytes(shape)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)


def build_large_checkpoint(
    out_dir: str | Path, total_bytes: float = 2e9, num_shards: int = 4, fill: str = "sparse", seed: int = 0
) -> Path:
    """Write Llama-shaped bf16 safetensors shards of about `total_bytes` plus index and config.json.

    fill="sparse" (default) writes the headers and leaves the data as a sparse hole of zeros (instant;
    the bytes still count and transfer in full); fill="empty" materialises uninitialised tensors through
    safetensors.torch.save_file; fill="random" draws seeded random bytes, for incompressible data.
    """
    import torch
    import transformers
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = _large_shape(int(total_bytes))
    head_dim = s["hidden"] // s["heads"]
    H, FF, V, KV = s["hidden"], s["inter"], s["vocab"], s["kv"] * head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (V, H))]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (H, H)),
            (p + "self_attn.k_proj.weight", (KV, H)),
            (p + "self_attn.v_proj.weight", (KV, H)),
            (p + "self_attn.o_proj.weight", (H, H)),
            (p + "mlp.gate_proj.weight", (FF, H)),
            (p + "mlp.up_proj.weight", (FF, H)),
            (p + "mlp.down_proj.weight", (H, FF)),
            (p + "input_layernorm.weight", (H,)),
            (p + "post_attention_layernorm.weight", (H,)),
        ]
    shapes += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]

    def nbytes(shape):
        n = 2
        for d in shape:
            n *= d
        return n

    total = sum(nbytes(sh) for _, sh in shapes)
    num_shards = max(1, min(num_shards, len(shapes)))
    target = total / num_shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    acc = 0
    for i, (name, shape) in enumerate(shapes):
        groups[-1].append((name, shape))
        acc += nbytes(shape)
        tensors_left, groups_left = len(shapes) - i - 1, num_shards - len(groups)
        if groups_left > 0 and tensors_left > 0 and (acc >= target * len(groups) or tensors_left <= groups_left):
            groups.append([])

    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for idx, group in enumerate(groups, start=1):
        fname = f"model-{idx:05d}-of-{len(groups):05d}.safetensors"
        weight_map.update({name: fname for name, _ in group})
        if fill == "sparse":
            _write_sparse_safetensors(out / fname, group, nbytes)
        else:
            tensors = {}
            for name, shape in group:
                if fill == "random":
                    t = torch.randint(0, 256, (nbytes(shape),), dtype=torch.uint8, generator=gen)
                    tensors[name] = t.view(torch.bfloat16).view(shape)
                else:
                    tensors[name] = torch.empty(shape, dtype=torch.bfloat16)
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            del tensors
        (out / fname).chmod(0o644)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"
    )
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FF,
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(out)
    return out
