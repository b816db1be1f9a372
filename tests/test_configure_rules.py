"""Configure's pure rules, without transformers: --max-model-len parsing and derivation (L-*), dtype (D-*),
the architecture registry (M-*) and the legacy RoPE rules (L-08, L-09, L-12). The case labels in the names are
defined in docs/vllm-rules.md."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prestage.stages.configure import dtype as dt
from prestage.stages.configure import maxlen, rope
from prestage.stages.errors import InvalidModelError, UnsupportedError, UsageError
from prestage.stages.launch import registry
from tests.support.cli import child_env


def cfg(**kw):
    """A config-like object: only the attributes given exist (getattr(None) for the rest, as vLLM reads)."""
    return SimpleNamespace(**kw)


# ---- --max-model-len parsing (L-23) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text,value",
    [
        ("1K", 1024),
        ("1k", 1000),
        ("25.6k", 25600),
        ("auto", -1),
        ("-1", -1),
        ("AUTO", -1),
        ("4096", 4096),
        ("2M", 2 * 2**20),
        ("1.5m", 1_500_000),
        (None, None),
        (8192, 8192),
    ],
)
def test_L23_max_model_len_human_readable(text, value):
    assert maxlen.parse_max_model_len(text) == value


@pytest.mark.parametrize("text", ["1.5K", "0", "-2", "abc", "4kk", "1.00001k", ""])
def test_L23_max_model_len_rejects_bad_values(text):
    if text == "":
        assert maxlen.parse_max_model_len(text) is None
        return
    with pytest.raises(UsageError, match="--max-model-len"):
        maxlen.parse_max_model_len(text)


# ---- max_model_len derivation (L-01..L-22) ---------------------------------------------------------


def test_L01_linear_rope_scales_max_len():
    c = cfg(max_position_embeddings=4096, rope_parameters={"type": "linear", "rope_type": "linear", "factor": 4})
    r = maxlen.resolve_max_model_len(c, None)
    assert (r.max_model_len, r.key, r.derived) == (16384, "max_position_embeddings", 16384)


@pytest.mark.parametrize(
    "kw",
    [
        {"max_position_embeddings": 0},
        {"max_position_embeddings": -5},
        {"max_position_embeddings": 4096, "rope_parameters": {"rope_type": "linear", "factor": -2}},
        {"max_position_embeddings": 4096, "rope_parameters": {"rope_type": "linear", "factor": 0}},
        {"max_position_embeddings": 4096, "rope_parameters": {"rope_type": "dynamic", "factor": float("nan")}},
    ],
)
def test_L01_non_positive_length_or_factor_is_invalid_model(kw):
    """A derived max_model_len below 1 (a zero/negative length key or rope factor) is refused by configure;
    it used to be recorded (max_model_len -8192) and crash launch with an internal error."""
    with pytest.raises(InvalidModelError, match="config.json"):
        maxlen.resolve_max_model_len(cfg(**kw), None)


def test_L02_dynamic_rope_scales_max_len():
    c = cfg(max_position_embeddings=2048, rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    assert maxlen.resolve_max_model_len(c, None).max_model_len == 4096


def test_L03_llama3_rope_not_scaled():
    c = cfg(
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
    )
    assert maxlen.resolve_max_model_len(c, None).max_model_len == 131072


def test_L04_yarn_not_scaled():
    c = cfg(
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    )
    assert maxlen.resolve_max_model_len(c, None).max_model_len == 32768


def test_L05_longrope_defaults_to_original_and_accepts_up_to_derived():
    c = cfg(
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_parameters={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]},
    )
    r = maxlen.resolve_max_model_len(c, None)
    assert (r.max_model_len, r.derived) == (4096, 131072)
    assert maxlen.resolve_max_model_len(c, 131072).max_model_len == 131072
    with pytest.raises(UsageError, match="131073"):
        maxlen.resolve_max_model_len(c, 131073)


def test_L07_gemma3_never_scaled():
    c = cfg(
        model_type="gemma3_text", max_position_embeddings=32768, rope_parameters={"rope_type": "linear", "factor": 8.0}
    )
    assert maxlen.resolve_max_model_len(c, None).max_model_len == 32768


def test_L11_null_factor_is_one_with_warning():
    c = cfg(max_position_embeddings=4096, rope_parameters={"rope_type": "linear", "factor": None})
    r = maxlen.resolve_max_model_len(c, None)
    assert r.max_model_len == 4096 and any("null scaling factor" in w for w in r.warnings)


def test_L14_minimum_of_length_keys():
    r = maxlen.resolve_max_model_len(cfg(max_position_embeddings=4096, n_positions=2048), None)
    assert (r.max_model_len, r.key) == (2048, "n_positions")


def test_L15_model_max_length_overrides_even_when_larger():
    r = maxlen.resolve_max_model_len(cfg(max_position_embeddings=4096, model_max_length=8192), None)
    assert (r.max_model_len, r.key) == (8192, "model_max_length")


def test_L16_no_length_key_assumes_2048():
    r = maxlen.resolve_max_model_len(cfg(), None)
    assert (r.max_model_len, r.key) == (2048, "default") and "2048" in r.warnings[0]


def test_L17_no_length_key_user_value_kept_unchecked():
    r = maxlen.resolve_max_model_len(cfg(), 5000)
    assert (r.max_model_len, r.derived) == (5000, None)


def test_L18_user_value_above_derived_is_refused():
    with pytest.raises(UsageError) as e:  # the flag's value is at fault: usage (2), not invalid-model
        maxlen.resolve_max_model_len(cfg(max_position_embeddings=4096), 8192)
    assert "8192" in str(e.value) and "max_position_embeddings=4096" in str(e.value)
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN" in str(e.value)


def test_L19_allow_long_keeps_user_value_with_warning():
    r = maxlen.resolve_max_model_len(cfg(max_position_embeddings=4096), 8192, allow_long=True)
    assert r.max_model_len == 8192 and r.warnings


def test_L20_disable_sliding_window_caps_length():
    c = cfg(max_position_embeddings=32768, sliding_window=4096)
    r = maxlen.resolve_max_model_len(c, None, disable_sliding_window=True)
    assert (r.max_model_len, r.key) == (4096, "sliding_window")
    assert maxlen.resolve_max_model_len(c, None).max_model_len == 32768


def test_L22_gpt2_n_positions_without_rope():
    r = maxlen.resolve_max_model_len(cfg(n_positions=1024), None)
    assert r.max_model_len == 1024 and isinstance(r.max_model_len, int) and r.key == "n_positions"


# ---- legacy RoPE rules (L-06, L-08, L-09, L-10, L-12) -----------------------------------------------


def test_L06_su_becomes_longrope():
    rp, patches, warns = {"type": "su", "short_factor": [1.0]}, [], []
    rope.legacy_rules(rp, "rope_scaling", patches, warns)
    assert rp["rope_type"] == "longrope" and rp["type"] == "su"
    assert [p["rule"] for p in patches] == ["R5 legacy type", "R7 su->longrope"]
    # a second pass over the same dict (vLLM patches config and text config) does not raise
    rope.legacy_rules(rp, "rope_scaling", [], [])


def test_L08_conflicting_type_and_rope_type():
    with pytest.raises(InvalidModelError, match="rope_type=dynamic.*type=linear"):
        rope.legacy_rules({"type": "linear", "rope_type": "dynamic", "factor": 2}, "rope_scaling", [], [])


def test_L09_mrope_needs_section():
    with pytest.raises(InvalidModelError, match="mrope_section"):
        rope.legacy_rules({"type": "mrope"}, "rope_scaling", [], [])


def test_L10_mrope_with_section_becomes_default():
    rp = {"type": "mrope", "mrope_section": [16, 24, 24]}
    rope.legacy_rules(rp, "rope_scaling", [], [])
    assert rp["rope_type"] == "default"
    r = maxlen.resolve_max_model_len(cfg(max_position_embeddings=32768, rope_parameters=rp), None)
    assert r.max_model_len == 32768


def test_L12_telechat3_yarn():
    rp, patches = {"rope_type": "telechat3-yarn", "factor": 4}, []
    rope.legacy_rules(rp, "rope_scaling", patches, [])
    assert rp["rope_type"] == "yarn" and rp["attention_factor"] == pytest.approx(1.09704, abs=1e-5)
    r = maxlen.resolve_max_model_len(cfg(max_position_embeddings=8192, rope_parameters=rp), None)
    assert r.max_model_len == 8192  # YaRN is not scaled


def test_rope_nested_detection():
    assert rope.is_nested({"full_attention": {}, "sliding_attention": {}}, {"full_attention", "sliding_attention"})
    assert not rope.is_nested({"rope_type": "default"}, {"full_attention"})


# ---- dtype (D-01..D-08) -----------------------------------------------------------------------------

SM80, SM70, SM75 = (8, 0), (7, 0), (7, 5)


def test_D01_fp32_checkpoint_becomes_bf16_on_ampere():
    chosen, note = dt.resolve_dtype("llama", "float32", "auto", SM80)
    assert chosen == "bfloat16" and "downcasting" in note


def test_D02_fp32_checkpoint_becomes_fp16_on_volta():
    assert dt.resolve_dtype("llama", "float32", "auto", SM70)[0] == "float16"


def test_D03_pooling_prefers_fp16():
    assert dt.resolve_dtype("llama", "float32", "auto", SM80, pooling=True)[0] == "float16"


def test_D04_bf16_checkpoint_on_t4_falls_back_to_fp16():
    chosen, note = dt.resolve_dtype("llama", "bfloat16", "auto", SM75)
    assert chosen == "float16" and "does not support bfloat16" in note


def test_D05_gemma2_refuses_half():
    with pytest.raises(InvalidModelError, match="gemma2.*float16"):
        dt.resolve_dtype("gemma2", "float32", dt.normalize_requested("half"), SM80)


def test_D06_gemma2_fp32_on_volta_stays_fp32():
    assert dt.resolve_dtype("gemma2", "float32", "auto", SM70)[0] == "float32"


def _write_safetensors(path, dtypes):
    """A valid file holding one zero element of each dtype (the header parser checks the layout)."""
    header, pos = {}, 0
    for i, d in enumerate(dtypes):
        size = {"F16": 2, "BF16": 2, "F32": 4}[d]
        header[f"t{i}"] = {"dtype": d, "shape": [1], "data_offsets": [pos, pos + size]}
        pos += size
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * pos)


def test_D07_dtype_from_safetensors_headers(tmp_path):
    _write_safetensors(tmp_path / "model.safetensors", ["F16", "F16"])
    d, source = dt.config_dtype(cfg(dtype=None), tmp_path)
    assert (d, source) == ("float16", "safetensors headers")
    assert dt.resolve_dtype("llama", d, "auto", SM80)[0] == "float16"


def test_D07_common_broadcastable_mixed_headers(tmp_path):
    _write_safetensors(tmp_path / "a.safetensors", ["BF16", "F32", "F32"])
    assert dt.config_dtype(cfg(), tmp_path)[0] == "float32"
    assert dt.common_broadcastable({"float16", "bfloat16"}) in {"float16", "bfloat16"}


def test_D08_no_dtype_anywhere_is_fp32_then_bf16(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    d, _ = dt.config_dtype(cfg(), tmp_path)
    assert d == "float32" and dt.resolve_dtype("llama", d, "auto", SM80)[0] == "bfloat16"


def test_dtype_bad_values_and_cpu_fallback():
    with pytest.raises(UsageError, match="float8"):
        dt.normalize_requested("float8")
    assert dt.normalize_requested("half") == "float16" and dt.normalize_requested("float") == "float32"
    assert dt.cpu_dtype("auto")[0] == "float32" and dt.cpu_dtype("bfloat16")[0] == "bfloat16"
    with pytest.raises(UsageError, match="compute capability 7.0"):
        dt.resolve_dtype("llama", "float16", "bfloat16", SM70)


def test_corrupt_safetensors_header_is_invalid_model(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x05")
    with pytest.raises(InvalidModelError, match="model.safetensors"):
        dt.config_dtype(cfg(), tmp_path)


# ---- registry (M-01..M-09) --------------------------------------------------------------------------


def known(*names):
    return lambda arch: arch in names


def test_M01_unknown_arch_lists_supported():
    with pytest.raises(UnsupportedError) as e:
        registry.resolve(["FooForCausalLM"], "auto", known())
    msg = str(e.value)
    assert "FooForCausalLM" in msg and "LlamaForCausalLM" in msg and "any causal LM transformers knows" in msg


def test_M02_previously_supported_says_until_version():
    with pytest.raises(UnsupportedError, match=r"MPTForCausalLM was supported in vLLM until v0\.28\.0"):
        registry.resolve(["MPTForCausalLM"], "auto", known())


def test_M03_out_of_tree_names_plugin():
    with pytest.raises(UnsupportedError, match="bart-plugin"):
        registry.resolve(["BartForConditionalGeneration"], "auto", known())


def test_M04_table_routes_to_transformers_backend():
    impl = registry.resolve(["GPTNeoXForCausalLM"], "auto", known("GPTNeoXForCausalLM"))
    assert (impl.impl, impl.cls, impl.warning) == ("transformers", registry.TRANSFORMERS_BACKEND, None)


def test_M05_model_impl_transformers_for_llama():
    impl = registry.resolve(["LlamaForCausalLM"], "transformers", known("LlamaForCausalLM"))
    assert impl.impl == "transformers" and impl.cls == registry.TRANSFORMERS_BACKEND


def test_M06_unregistered_transformers_arch_falls_back_with_warning():
    impl = registry.resolve(["Gemma2ForCausalLM"], "auto", known("Gemma2ForCausalLM"))
    assert impl.impl == "transformers" and "falling back to the Transformers" in impl.warning


def test_M07_native_never_falls_back():
    with pytest.raises(UnsupportedError, match="Gemma2ForCausalLM"):
        registry.resolve(["Gemma2ForCausalLM"], "native", known("Gemma2ForCausalLM"))


def test_M08_unknown_arch_with_transformers_impl():
    with pytest.raises(UnsupportedError, match="cannot find a model class for 'XForCausalLM'.*auto_map"):
        registry.resolve(["XForCausalLM"], "transformers", known())


def test_M09_sequence_classification_is_pooling_and_refused():
    with pytest.raises(UnsupportedError, match="pooling model.*classify.*text generation only"):
        registry.resolve(["LlamaForSequenceClassification"], "auto", known())


def test_native_families_and_base_names():
    for arch in (
        "LlamaForCausalLM",
        "LLaMAForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "LlamaModel",
        "Qwen2Model",
    ):
        impl = registry.resolve([arch], "auto", known())
        assert (impl.impl, impl.cls) == ("native", registry.DECODER)
    # the first usable architecture wins, in order
    assert registry.resolve(["FooForCausalLM", "Qwen3ForCausalLM"]).architecture == "Qwen3ForCausalLM"
    with pytest.raises(UnsupportedError, match="no model architectures"):
        registry.resolve([], "auto")


def test_registry_imports_without_torch_or_transformers():
    code = (
        "import sys; import prestage.stages.launch.registry, prestage.stages.configure, "
        "prestage.stages.configure.maxlen, prestage.stages.configure.dtype, prestage.stages.configure.rope, "
        "prestage.stages.configure.spec; "
        "bad = [m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_spec_param_count_formula_matches_hand_count():
    from prestage.stages.configure import spec as sp

    # tiny Qwen3 (qk_norm, tied): 2 layers, H=64, I=128, 4 heads x 16, 2 KV heads, V=1024
    s = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "vocab_size": 1024,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "attention_bias": False,
        "o_proj_bias": False,
        "qk_norm": True,
        "mlp_bias": False,
        "tie_word_embeddings": True,
    }
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 16 + 3 * 64 * 128 + 2 * 64
    assert sp.native_param_count(s) == 1024 * 64 + 2 * per_layer + 64
    assert math.isclose(sp.native_param_count(dict(s, tie_word_embeddings=False)) - sp.native_param_count(s), 1024 * 64)


def test_non_numeric_length_or_factor_is_invalid_model():
    with pytest.raises(InvalidModelError, match="seq_length='2k'"):
        maxlen.resolve_max_model_len(cfg(max_position_embeddings=4096, seq_length="2k"), None)
    with pytest.raises(InvalidModelError, match="rope factor 'x'"):
        maxlen.resolve_max_model_len(
            cfg(max_position_embeddings=4096, rope_parameters={"rope_type": "linear", "factor": "x"}), None
        )


@given(st.integers(min_value=1, max_value=10**7), st.sampled_from(["", "k", "K", "m", "M"]))
def test_L23_parse_round_trips_whole_numbers(n, suffix):
    scale = {"": 1, "k": 1000, "K": 1024, "m": 10**6, "M": 2**20}[suffix]
    assert maxlen.parse_max_model_len(f"{n}{suffix}") == n * scale
