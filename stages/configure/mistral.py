"""Mistral-format configs: `params.json` -> a Hugging Face style config dict (as vLLM, docs/vllm-rules.md §2.9).

Pure: takes the two JSON dicts (params.json, and config.json when the repo has one) and returns the dict
that becomes a generic transformers `PreTrainedConfig`, plus warnings.
"""

from __future__ import annotations

from prestage.stages.errors import InvalidModelError

_RENAMES = {
    "dim": "hidden_size",
    "norm_eps": "rms_norm_eps",
    "n_kv_heads": "num_key_value_heads",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "hidden_dim": "intermediate_size",
    "activation": "hidden_act",
    "tied_embeddings": "tie_word_embeddings",
}
DEFAULT_MAX_POSITIONS = 128000


def params_to_hf(params: dict, hf: dict | None) -> tuple[dict, list[str]]:
    warnings: list[str] = []
    out: dict = {}
    for key, value in params.items():
        out[_RENAMES.get(key, key)] = value
    out.setdefault("model_type", "transformer")
    out.setdefault("hidden_act", "silu")
    out.setdefault("tie_word_embeddings", False)
    if out.get("max_position_embeddings") is None:
        from_hf = (hf or {}).get("max_position_embeddings") or ((hf or {}).get("text_config") or {}).get(
            "max_position_embeddings"
        )
        if from_hf:
            out["max_position_embeddings"] = from_hf
        else:
            out["max_position_embeddings"] = DEFAULT_MAX_POSITIONS
            warnings.append(f"params.json has no max_position_embeddings; assuming {DEFAULT_MAX_POSITIONS}")
    out.setdefault("max_seq_len", out["max_position_embeddings"])

    sw = out.get("sliding_window")
    n_layers = out.get("num_hidden_layers")
    if isinstance(sw, list):
        windows = {w for w in sw if w is not None}
        if len(windows) > 1:
            raise InvalidModelError(
                f"params.json sliding_window {sw}: more than one window size; prestage (like vLLM) supports one"
            )
        pattern = ["sliding_attention" if w is not None else "full_attention" for w in sw]
        if isinstance(n_layers, int) and pattern:
            out["layer_types"] = [pattern[i % len(pattern)] for i in range(n_layers)]
        out["sliding_window"] = next(iter(windows)) if windows else None
    elif isinstance(sw, int) and "layer_types" not in out and isinstance(n_layers, int):
        out["layer_types"] = ["sliding_attention"] * n_layers
    elif sw is not None and not isinstance(sw, int):
        raise InvalidModelError(f"params.json sliding_window {sw!r}: expected an integer or a list")

    yarn = out.pop("yarn", None)
    if isinstance(yarn, dict):
        rp = {
            "rope_type": "yarn",
            "mscale_all_dim": 1,
            "rope_theta": out.get("rope_theta", 10000.0),
            "factor": yarn.get("factor"),
            "original_max_position_embeddings": yarn.get("original_max_position_embeddings"),
            "beta_fast": yarn.get("beta"),
            "beta_slow": yarn.get("alpha"),
        }
        if yarn.get("apply_scale") is False:
            rp["attention_factor"] = 1.0
        out["rope_parameters"] = {k: v for k, v in rp.items() if v is not None}

    moe = out.get("moe")
    if isinstance(moe, dict):
        arch = "MistralLarge3ForCausalLM" if moe.get("num_shared_experts") else "MixtralForCausalLM"
    elif out.get("model_type") == "mamba":
        arch = "Mamba2ForCausalLM"
    else:
        arch = "MistralForCausalLM"
    if out.get("vision_encoder") is not None:
        arch = "PixtralForConditionalGeneration"
    out["architectures"] = [arch]
    for key, value in (hf or {}).items():  # config.json only fills what params.json lacks
        out.setdefault(key, value)
    return out, warnings
