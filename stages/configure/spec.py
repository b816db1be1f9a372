"""The model `spec`: the shape facts launch and fetch-weights read instead of config.json (docs/vllm-rules.md, §2.10).

`build_spec(text_cfg, ...)` reads a (text) config with `getattr`, so attribute aliases of transformers configs
(GPT-2's `n_embd` as `hidden_size`, ...) work, and checks the values can make a model. Parameter counts are
exact for the native decoder families (Llama, Mistral, Qwen2, Qwen3); for other architectures they come from
`count_params_meta` (the transformers model built on the meta device: no memory, no weights), when possible.
"""

from __future__ import annotations

from prestage.stages import safetensors
from prestage.stages.errors import InvalidModelError

_KV_KEYS = ("n_head_kv", "num_kv_heads", "num_key_value_heads", "multi_query_group_num", "num_attention_groups")
_EXPERT_KEYS = ("num_experts", "moe_num_experts", "n_routed_experts", "num_local_experts")


def _int(cfg, name: str, *, required: bool = True) -> int | None:
    v = getattr(cfg, name, None)
    if v is None:
        if required:
            raise InvalidModelError(f"config.json has no {name}; add it (the model's {name.replace('_', ' ')})")
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidModelError(f"config.json {name}={v!r} is not an integer; fix config.json")
    return v


def num_kv_heads(cfg, heads: int) -> int:
    """vLLM `get_total_num_kv_heads`: the first KV-head key present, Falcon's multi_query, else all heads."""
    if (
        getattr(cfg, "model_type", None) in ("falcon", "RefinedWeb", "RefinedWebModel")
        and getattr(cfg, "multi_query", False)
        and not getattr(cfg, "new_decoder_architecture", False)
    ):
        return 1
    for key in _KV_KEYS:
        v = getattr(cfg, key, None)
        if v is not None:
            return v
    return heads


def head_dim_of(cfg, hidden: int, heads: int) -> int:
    """vLLM `get_head_size` (non-MLA): head_dim if > 0, else hidden_size_per_head, else hidden // heads."""
    hd = getattr(cfg, "head_dim", None)
    if isinstance(hd, int) and not isinstance(hd, bool) and hd > 0:
        return hd
    hsph = getattr(cfg, "hidden_size_per_head", None)
    if isinstance(hsph, int) and hsph > 0:
        return hsph
    if hidden % heads:
        raise InvalidModelError(
            f"config.json hidden_size={hidden} is not divisible by num_attention_heads={heads} "
            "and no head_dim is given; fix one of them or add head_dim"
        )
    return hidden // heads


def num_experts(cfg) -> int:
    for key in _EXPERT_KEYS:
        v = getattr(cfg, key, None)
        if v is not None:
            return int(v[0] if isinstance(v, (list, tuple)) else v)
    return 0


def rope_of(cfg) -> dict | None:
    """The final rope parameters (plain dict), with partial_rotary_factor filled in; None for no RoPE."""
    rp = getattr(cfg, "rope_parameters", None)
    if not isinstance(rp, dict) or not rp:
        return None
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in rp.items()}
    flat = [out] if "rope_type" in out or "rope_theta" in out else [v for v in out.values() if isinstance(v, dict)]
    prf = getattr(cfg, "partial_rotary_factor", None)
    for d in flat:
        d.setdefault("partial_rotary_factor", 1.0 if prf is None else prf)
        for key in _ROPE_NUMBERS:
            v = d.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise InvalidModelError(
                    f"rope_parameters {key}={v!r}: must be a number; fix config.json (or --hf-overrides)"
                )
    return out


# RoPE fields launch reads as numbers (rope_type, short_factor/long_factor lists etc. are not checked here).
_ROPE_NUMBERS = (
    "rope_theta",
    "factor",
    "partial_rotary_factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "attention_factor",
    "mscale",
    "mscale_all_dim",
)


def qkv_bias(cfg, family: str | None) -> tuple[bool, bool]:
    """(q/k/v projections have a bias, o_proj has a bias) for the native families."""
    if family == "qwen2":  # Qwen2 always has q/k/v biases and no o_proj bias
        return True, False
    bias = bool(getattr(cfg, "attention_bias", False))
    return bias, bias


FAMILIES = {
    "llama": "llama",
    "mistral": "mistral",
    "ministral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "transformer": "mistral",
}  # "transformer": a Mistral-format params.json


def native_param_count(s: dict) -> int:
    """Exact parameter count of the shared native decoder, from the spec's shapes."""
    H, inter, V, L = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["num_hidden_layers"]
    q_out = s["num_attention_heads"] * s["head_dim"]  # q_proj: [q_out, H]
    kv_out = s["num_key_value_heads"] * s["head_dim"]  # k_proj, v_proj: [kv_out, H]
    attn = H * q_out + 2 * H * kv_out + q_out * H  # q, k, v, o weights
    if s["attention_bias"]:
        attn += q_out + 2 * kv_out
    if s["o_proj_bias"]:
        attn += H
    if s["qk_norm"]:
        attn += 2 * s["head_dim"]  # q_norm, k_norm: [head_dim]
    mlp = 3 * H * inter + ((2 * inter + H) if s["mlp_bias"] else 0)  # gate/up: [inter, H], down: [H, inter]
    layer = attn + mlp + 2 * H  # input_layernorm, post_attention_layernorm: [H]
    total = V * H + L * layer + H  # embed_tokens [V, H], layers, final norm [H]
    if not s["tie_word_embeddings"]:
        total += V * H  # lm_head [V, H]
    return total


def build_spec(cfg, *, native: bool, weight_dtype: str, sliding_window) -> dict:
    """The spec of the text config `cfg`; raises InvalidModelError on values that cannot make a model."""
    model_type = getattr(cfg, "model_type", None)
    heads = _int(cfg, "num_attention_heads")
    hidden = _int(cfg, "hidden_size")
    layers = _int(cfg, "num_hidden_layers")
    vocab = _int(cfg, "vocab_size")
    for name, v in (
        ("num_attention_heads", heads),
        ("hidden_size", hidden),
        ("num_hidden_layers", layers),
        ("vocab_size", vocab),
    ):
        if v < 1:
            raise InvalidModelError(f"config.json {name}={v}: must be at least 1; fix config.json")
    kv = num_kv_heads(cfg, heads)
    if not isinstance(kv, int) or kv < 1 or heads % kv:
        raise InvalidModelError(
            f"config.json num_key_value_heads={kv} must be >= 1 and divide num_attention_heads={heads}; fix config.json"
        )
    hd = head_dim_of(cfg, hidden, heads)
    inter = getattr(cfg, "intermediate_size", None)
    if inter is None and getattr(cfg, "n_inner", "absent") != "absent":  # GPT-2 style: n_inner or 4*hidden
        inter = getattr(cfg, "n_inner", None) or 4 * hidden
    if native and (not isinstance(inter, int) or inter < 1):
        raise InvalidModelError(f"config.json intermediate_size={inter!r}: must be a positive integer")
    family = FAMILIES.get(model_type) if native else None
    bias, o_bias = qkv_bias(cfg, family)
    spec = {
        "model_type": model_type,
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "vocab_size": vocab,
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "sliding_window": sliding_window,
        "layer_types": list(getattr(cfg, "layer_types", None) or []) or None,
        "rope": rope_of(cfg),
        "rms_norm_eps": getattr(cfg, "rms_norm_eps", None),
        "attention_bias": bias,
        "o_proj_bias": o_bias,
        "mlp_bias": bool(getattr(cfg, "mlp_bias", False)),
        "qk_norm": family == "qwen3",
        "hidden_act": getattr(cfg, "hidden_act", None) or getattr(cfg, "activation_function", None),
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
        "num_experts": num_experts(cfg),
        "weight_dtype": weight_dtype,
    }
    spec["param_count"] = native_param_count(spec) if native else None
    spec["weight_bytes"] = (
        spec["param_count"] * safetensors.torch_itemsize(weight_dtype) if spec["param_count"] else None
    )
    return spec


def count_params_meta(config, trust_remote_code: bool) -> int | None:
    """Parameters of the transformers causal-LM for `config`, built on the meta device (no memory used)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:
        return None
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
