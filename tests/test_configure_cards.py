"""Configure on the config.json of public model cards (tests/data/configs/*.json), checked field by field.

Each card's folder holds only its config.json (no weights), so dtype comes from the config. Expected values
are the public facts of each model (parameter counts as published, context lengths as vLLM 0.33 derives
them). The Phi-3 long/short factor lists keep the card's length (48 = head_dim/2) with abbreviated values.
Case labels in comments (L-05, D-01, ...) are defined in docs/vllm-rules.md.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from prestage.stages.configure import ConfigureStage, configure
from prestage.stages.errors import InvalidModelError, UsageError
from prestage.stages.launch import registry
from prestage.stages.manifest import Manifest, canonical_bytes

CARDS = Path(__file__).parent / "data" / "configs"
OUTPUT_KEYS = {
    "config",
    "config_class",
    "model_type",
    "architectures",
    "patches",
    "max_model_len",
    "max_model_len_key",
    "derived_max_model_len",
    "dtype",
    "implementation",
    "engines",
    "spec",
    "trust_remote_code",
    "remote_code",
}
SPEC_KEYS = {
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "sliding_window",
    "rope",
    "rms_norm_eps",
    "attention_bias",
    "qk_norm",
    "hidden_act",
    "max_position_embeddings",
    "param_count",
    "weight_bytes",
}
NATIVE = {"architecture": None, "impl": "native", "class": registry.DECODER}


def run_card(tmp_path, name, **params):
    folder = tmp_path / name
    folder.mkdir(parents=True)
    shutil.copy(CARDS / f"{name}.json", folder / "config.json")
    inputs = ConfigureStage().inputs(params, {})
    record, warnings = configure(folder, "config.json", inputs)
    out = record.to_dict()
    assert set(out) == OUTPUT_KEYS
    assert SPEC_KEYS <= set(out["spec"])
    # plain data that a manifest can hold, byte-stable across two runs
    again = configure(folder, "config.json", inputs)[0].to_dict()
    assert canonical_bytes(out) == canonical_bytes(again)
    Manifest(stage="configure", stage_version=1, inputs=inputs, upstream={}, outputs=out).to_bytes()
    assert "_name_or_path" not in out["config"] and "transformers_version" not in out["config"]
    return out, warnings


def rules(out):
    return [p["rule"] for p in out["patches"]]


def test_card_llama_2_7b(tmp_path):
    out, _ = run_card(tmp_path, "llama-2-7b")
    assert out["config_class"] == "transformers.models.llama.configuration_llama.LlamaConfig"
    assert (out["model_type"], out["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert (out["max_model_len"], out["max_model_len_key"], out["derived_max_model_len"]) == (
        4096,
        "max_position_embeddings",
        4096,
    )
    assert out["dtype"]["config"] == "float16" and out["dtype"]["gpu"] == "float16"
    assert out["dtype"]["cpu"] == "float32" and "CPU runs float32" in out["dtype"]["note"]
    assert out["implementation"] == dict(NATIVE, architecture="LlamaForCausalLM")
    s = out["spec"]
    assert (
        s["num_hidden_layers"],
        s["hidden_size"],
        s["intermediate_size"],
        s["num_attention_heads"],
        s["num_key_value_heads"],
        s["head_dim"],
        s["vocab_size"],
    ) == (32, 4096, 11008, 32, 32, 128, 32000)
    assert s["rope"] == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    assert (s["rms_norm_eps"], s["attention_bias"], s["qk_norm"], s["hidden_act"]) == (1e-05, False, False, "silu")
    assert s["param_count"] == 6_738_415_616 and s["weight_bytes"] == 2 * 6_738_415_616
    assert (s["tie_word_embeddings"], s["sliding_window"]) == (False, None)
    assert "torch_dtype->dtype" in rules(out)  # C-10
    assert out["config"]["dtype"] == "float16" and out["trust_remote_code"] is False and out["remote_code"] is None


def test_card_llama_3_1_8b_llama3_rope(tmp_path):
    out, _ = run_card(tmp_path, "llama-3.1-8b")
    assert out["max_model_len"] == 131072  # L-03: llama3 rope is not scaled
    assert out["spec"]["rope"] == {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "partial_rotary_factor": 1.0,
    }
    assert out["spec"]["num_key_value_heads"] == 8 and out["spec"]["param_count"] == 8_030_261_248
    assert out["dtype"]["gpu"] == "bfloat16" and out["implementation"]["impl"] == "native"


def test_card_mistral_7b_sliding_window(tmp_path):
    out, _ = run_card(tmp_path, "mistral-7b-v0.1")
    assert out["spec"]["sliding_window"] == 4096 and out["max_model_len"] == 32768
    assert out["spec"]["param_count"] == 7_241_732_096
    assert out["implementation"] == dict(NATIVE, architecture="MistralForCausalLM")
    # L-20: --disable-sliding-window caps the length to the window and drops the window
    capped, _ = run_card(tmp_path / "off", "mistral-7b-v0.1", disable_sliding_window=True)
    assert (capped["max_model_len"], capped["max_model_len_key"]) == (4096, "sliding_window")
    assert capped["spec"]["sliding_window"] is None and capped["config"]["sliding_window"] is None
    assert "disable sliding window" in rules(capped)


def test_card_qwen2_0_5b_bias_tied(tmp_path):
    out, _ = run_card(tmp_path, "qwen2-0.5b")
    s = out["spec"]
    assert (s["attention_bias"], s["o_proj_bias"], s["tie_word_embeddings"], s["qk_norm"]) == (True, False, True, False)
    assert s["param_count"] == 494_032_768
    assert s["sliding_window"] is None  # use_sliding_window: false
    assert "sliding_window" in rules(out)
    assert out["max_model_len"] == 131072 and out["dtype"]["gpu"] == "bfloat16"


def test_card_qwen2_5_7b_yarn(tmp_path):
    out, _ = run_card(tmp_path, "qwen2.5-7b-yarn")
    assert (out["max_model_len"], out["derived_max_model_len"]) == (32768, 32768)  # L-04: yarn not scaled
    rp = out["spec"]["rope"]
    assert (rp["rope_type"], rp["factor"], rp["original_max_position_embeddings"], rp["rope_theta"]) == (
        "yarn",
        4.0,
        32768,
        1000000.0,
    )
    assert out["config"]["rope_parameters"]["type"] == "yarn"  # the legacy key is kept (L-01 style)
    assert out["spec"]["param_count"] == 7_615_616_512
    with pytest.raises(UsageError, match="128000"):  # a longer context than derived is refused (L-18)
        run_card(tmp_path / "x", "qwen2.5-7b-yarn", max_model_len="128k")


def test_card_qwen3_0_6b(tmp_path):
    out, _ = run_card(tmp_path, "qwen3-0.6b")
    s = out["spec"]
    assert (s["qk_norm"], s["attention_bias"], s["head_dim"], s["tie_word_embeddings"]) == (True, False, 128, True)
    assert s["param_count"] == 596_049_920 and s["weight_bytes"] == 2 * 596_049_920
    assert out["max_model_len"] == 40960 and out["implementation"]["architecture"] == "Qwen3ForCausalLM"


def test_card_phi_3_mini_128k_longrope(tmp_path):
    out, warnings = run_card(tmp_path, "phi-3-mini-128k")
    # L-05: derived 131072, default the short pre-training context
    assert (out["max_model_len"], out["derived_max_model_len"], out["max_model_len_key"]) == (
        4096,
        131072,
        "original_max_position_embeddings",
    )
    assert out["spec"]["rope"]["rope_type"] == "longrope"
    assert out["spec"]["rope"]["original_max_position_embeddings"] == 4096
    # C-03: auto_map.AutoConfig with a built-in model_type and no trust: transformers' class, no code run
    assert out["config_class"].endswith("Phi3Config") and out["remote_code"] is None
    assert any("built in" in w for w in warnings)
    assert out["implementation"] == {
        "architecture": "Phi3ForCausalLM",
        "impl": "transformers",
        "class": registry.TRANSFORMERS_BACKEND,
    }
    assert out["spec"]["param_count"] == 3_821_079_552
    longest, _ = run_card(tmp_path / "l", "phi-3-mini-128k", max_model_len="131072")
    assert longest["max_model_len"] == 131072


def test_card_phi_3_mini_128k_su_is_longrope(tmp_path):
    out, warnings = run_card(tmp_path, "phi-3-mini-128k-su")  # L-06
    assert out["spec"]["rope"]["rope_type"] == "longrope" and out["max_model_len"] == 4096
    assert "R7 su->longrope" in rules(out)
    assert any("'su' with 'longrope'" in w for w in warnings)


def test_card_gemma_2_2b(tmp_path):
    out, _ = run_card(tmp_path, "gemma-2-2b")
    assert out["dtype"]["config"] == "float32" and out["dtype"]["gpu"] == "bfloat16"  # D-01
    assert out["implementation"]["impl"] == "transformers"
    s = out["spec"]
    assert (s["head_dim"], s["num_key_value_heads"], s["sliding_window"]) == (256, 4, 4096)
    assert s["layer_types"][:2] == ["sliding_attention", "full_attention"]
    assert s["param_count"] == 2_614_341_888 and s["weight_bytes"] == 2 * 2_614_341_888
    assert out["max_model_len"] == 8192
    with pytest.raises(InvalidModelError, match="float16"):  # D-05
        run_card(tmp_path / "h", "gemma-2-2b", dtype="half")


def test_card_gpt2_n_positions(tmp_path):
    out, _ = run_card(tmp_path, "gpt2")
    assert out["max_model_len"] == 1024 and isinstance(out["max_model_len"], int)  # L-22
    s = out["spec"]
    assert (s["hidden_size"], s["num_attention_heads"], s["num_hidden_layers"], s["intermediate_size"]) == (
        768,
        12,
        12,
        3072,
    )
    assert s["rope"] is None and s["param_count"] == 124_439_808
    assert out["dtype"]["config"] == "float32" and out["dtype"]["gpu"] == "bfloat16"  # D-08
    assert out["implementation"]["architecture"] == "GPT2LMHeadModel"
