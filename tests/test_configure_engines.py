"""configure's outcome is vLLM's: config classes vLLM builds itself, its full architecture table, and the record
of which engine runs the model (prestage's own: native / transformers / none; vLLM: yes / no and how).

Cards in tests/data/configs (config.json only, no weights). The vLLM facts asserted here are those of the
vLLM release in stages/launch/vllm_table.py; tests/vllm/ checks them against that vLLM itself.
"""

from __future__ import annotations

import pytest

from prestage.stages.errors import UnsupportedError, UntrustedCodeError
from prestage.stages.launch import registry, vllm_table
from tests.test_configure_cards import run_card


def test_chatglm_builds_with_prestage_config_class_and_runs_on_vllm_only(tmp_path):
    out, warnings = run_card(tmp_path, "chatglm3-6b")  # no --trust-remote-code: vLLM has the config class
    assert out["config_class"].endswith("ChatGLMConfig") and out["model_type"] == "chatglm"
    assert out["remote_code"] is None and out["trust_remote_code"] is False
    assert out["max_model_len"] == 8192 and out["max_model_len_key"] == "seq_length"
    spec = out["spec"]
    assert (spec["num_hidden_layers"], spec["num_attention_heads"], spec["num_key_value_heads"]) == (28, 32, 2)
    assert spec["head_dim"] == 128 and spec["vocab_size"] == 65024
    assert out["dtype"]["gpu"] == "float16"
    assert out["implementation"] == {"architecture": "ChatGLMModel", "impl": "none", "class": ""}
    assert out["engines"] == {"prestage": "none", "vllm": "yes", "vllm_how": "vllm:chatglm.ChatGLMForCausalLM"}
    assert any("prestage's engine has no ChatGLMModel" in w and "--engine vllm" in w for w in warnings)


def test_kimi_k2_is_deepseek_v3_config(tmp_path):
    out, _ = run_card(tmp_path, "kimi-k2-instruct")
    assert out["config_class"] == "prestage.stages.configure.configs.DeepseekV3Config"  # vLLM's class name
    assert out["model_type"] == "kimi_k2"
    assert out["remote_code"] is None
    from transformers import DeepseekV3Config

    assert DeepseekV3Config.model_type == "deepseek_v3"  # transformers' own class left as it was
    assert out["config"]["kv_lora_rank"] == 512 and out["config"]["n_routed_experts"] == 384
    assert out["max_model_len"] == 131072 and out["dtype"]["gpu"] == "bfloat16"
    assert out["engines"]["vllm"] == "yes" and out["engines"]["vllm_how"] == "vllm:deepseek_v2.DeepseekV3ForCausalLM"
    assert out["engines"]["prestage"] == "transformers"


def test_minicpm3_without_model_type_says_so(tmp_path):
    with pytest.raises(UntrustedCodeError) as e:
        run_card(tmp_path, "minicpm3-4b")
    msg = str(e.value)
    assert "None" not in msg and "no model_type" in msg and "configuration_minicpm.MiniCPMConfig" in msg
    assert "--trust-remote-code" in msg


def test_registered_names_decide_the_runner_before_the_suffix():
    # vLLM registers ChatGLMModel as a generating class: not a pooling `*Model`
    assert registry.runner_of(["ChatGLMModel"]) == ("generate", "none")
    assert registry.runner_of(["BertModel"]) == ("pooling", "none")  # registered, a pooling class
    assert registry.runner_of(["FooModel"]) == ("pooling", "embed")  # unregistered: the suffix rule
    assert registry.runner_of(["LlamaModel"]) == ("generate", "none")
    assert registry.runner_of(["MiniCPM3ForCausalLM"]) == ("generate", "none")


def test_vllm_support_by_table():
    assert registry.vllm_support(["ChatGLMModel"]).how == "vllm:chatglm.ChatGLMForCausalLM"
    assert registry.vllm_support(["GPTNeoXForCausalLM"]).how == "transformers"  # vLLM's table routes it so
    assert not registry.vllm_support(["GPTNeoXForCausalLM"], "native").runs  # ... and has no own class
    assert registry.vllm_support(["FooForCausalLM"], "auto", lambda a: True).how == "transformers"
    no = registry.vllm_support(["FooForCausalLM"])
    assert not no.runs and vllm_table.VLLM_VERSION in no.how
    assert "0.28.0" in registry.vllm_support(["StableLMEpochForCausalLM"]).how
    # a *ForSequenceClassification of a registered family normalizes, but the runner is pooling
    assert not registry.vllm_support(["LlamaForSequenceClassification"]).runs


def test_previously_supported_table_is_vllms():
    assert registry.PREVIOUSLY_SUPPORTED["StableLMEpochForCausalLM"] == "0.28.0"
    with pytest.raises(UnsupportedError, match=r"StableLMEpochForCausalLM was supported in vLLM until v0\.28\.0"):
        registry.resolve(["StableLMEpochForCausalLM"], "auto")


def test_a_model_type_only_vllm_can_build_is_named(tmp_path):
    import json

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "step3_text", "architectures": ["Step3TextForCausalLM"]}))
    from prestage.stages.configure import ConfigureStage, configure

    with pytest.raises(UnsupportedError, match="step3_text.*vLLM's own config class"):
        configure(d, "config.json", ConfigureStage().inputs({}, {}))
