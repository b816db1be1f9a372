"""Configure's cases (docs/vllm-rules.md: C-01..C-11, L-13, L-21) on small config folders, hf_overrides, bad
input, remote code from a local folder and from the local test hub at the pinned commit, and the CLI end to end
(exit codes).

C-12 (`--quantization` vs the checkpoint's quantization_config) does not apply: prestage has no --quantization.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest

from prestage.stages import manifest
from prestage.stages.configure import ConfigureStage, configure
from prestage.stages.configure import hf_config as load
from prestage.stages.errors import InvalidModelError, UnsupportedError, UntrustedCodeError, UsageError

CARDS = Path(__file__).parent / "data" / "configs"
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 4096,
}

# A repo's own config code, as remote-code repos ship it (written by the tests, not a real repo's file).
REMOTE_CONFIG_PY = """
from transformers import PreTrainedConfig


class InternLM2Config(PreTrainedConfig):
    model_type = "internlm2"

    def __init__(self, vocab_size=103168, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
                 max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000,
                 rope_scaling=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
"""


def folder_with(tmp_path, config, name="m", files=None) -> Path:
    d = tmp_path / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    for fname, text in (files or {}).items():
        (d / fname).write_text(text)
    return d


def run(folder, **params):
    record, warnings = configure(folder, "config.json", ConfigureStage().inputs(params, {}))
    return record.to_dict(), warnings


# ---- config class choice (C-01..C-09) -----------------------------------------------------------------

CUSTOM = dict(
    LLAMA,
    model_type="my_custom",
    architectures=["XForCausalLM"],
    auto_map={"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"},
)
CUSTOM_PY = REMOTE_CONFIG_PY.replace("InternLM2Config", "XConfig").replace('"internlm2"', '"my_custom"')
# The repo's model class: Llama's, which supports transformers' attention backends (vLLM's compatibility check)
MODELING_PY = (
    "from transformers import LlamaForCausalLM\n"
    "from .configuration_x import XConfig\n\n\n"
    "class XForCausalLM(LlamaForCausalLM):\n"
    "    config_class = XConfig\n"
)
# A model class with its own attention module that bypasses the attention interface: not backend-compatible
MODELING_OLD_PY = (
    "import torch.nn as nn\n"
    "from transformers import PreTrainedModel\n"
    "from .configuration_x import XConfig\n\n\n"
    "class XAttention(nn.Module):\n"
    "    pass\n\n\n"
    "class XForCausalLM(PreTrainedModel):\n"
    "    config_class = XConfig\n"
)


def test_C01_untrusted_remote_code_is_refused_naming_the_module(tmp_path):
    d = folder_with(tmp_path, CUSTOM, files={"configuration_x.py": CUSTOM_PY})
    with pytest.raises(UntrustedCodeError) as e:
        run(d)
    msg = str(e.value)
    assert "auto_map.AutoConfig=configuration_x.XConfig" in msg and "--trust-remote-code" in msg
    assert "\n" not in msg


def test_C02_trusted_remote_code_builds_the_repo_class(tmp_path):
    d = folder_with(tmp_path, CUSTOM, files={"configuration_x.py": CUSTOM_PY, "modeling_x.py": MODELING_PY})
    out, _ = run(d, trust_remote_code=True)
    assert out["config_class"] == "remote:configuration_x.XConfig"
    assert out["trust_remote_code"] is True
    rc = out["remote_code"]
    assert rc["auto_map"]["AutoConfig"] == "configuration_x.XConfig" and rc["commit"] is None
    import hashlib

    assert rc["files"] == [
        {"path": "configuration_x.py", "sha256": hashlib.sha256(CUSTOM_PY.encode()).hexdigest()},
        {"path": "modeling_x.py", "sha256": hashlib.sha256(MODELING_PY.encode()).hexdigest()},
    ]
    # auto_map.AutoModelForCausalLM with trust, a backend-compatible class: the Transformers backend builds it
    assert out["implementation"]["impl"] == "transformers"
    assert out["engines"] == {"prestage": "transformers", "vllm": "yes", "vllm_how": "transformers"}


def test_trusted_remote_code_must_be_backend_compatible(tmp_path):
    """vLLM runs the repo's class on its Transformers backend only when that class supports attention backends
    (or its module calls the attention interface): otherwise neither engine runs it."""
    d = folder_with(tmp_path, CUSTOM, files={"configuration_x.py": CUSTOM_PY, "modeling_x.py": MODELING_OLD_PY})
    with pytest.raises(UnsupportedError, match="XForCausalLM"):
        run(d, trust_remote_code=True)
    (d / "modeling_x.py").unlink()  # the model code is missing: no class to check, refused the same way
    with pytest.raises(UnsupportedError, match="XForCausalLM"):
        run(d, trust_remote_code=True)


def test_C03_known_model_type_ignores_auto_map_without_trust(tmp_path):
    d = folder_with(tmp_path, dict(LLAMA, auto_map={"AutoConfig": "configuration_x.XConfig"}))
    out, warnings = run(d)
    assert out["config_class"].endswith("LlamaConfig") and out["remote_code"] is None
    assert any("built in" in w for w in warnings)


def test_C04_unknown_model_type_is_unsupported(tmp_path):
    d = folder_with(tmp_path, dict(LLAMA, model_type="totally_unknown"))
    with pytest.raises(UnsupportedError, match="totally_unknown"):
        run(d)


def test_C05_no_model_type_is_invalid(tmp_path):
    cfg = {k: v for k, v in LLAMA.items() if k != "model_type"}
    with pytest.raises(InvalidModelError, match="model_type"):
        run(folder_with(tmp_path, cfg))


def test_C06_refinedweb_uses_prestages_own_config_class(tmp_path):
    raw = {
        "architectures": ["RWForCausalLM"],
        "model_type": "RefinedWebModel",
        "hidden_size": 4544,
        "n_head": 71,
        "n_layer": 32,
        "vocab_size": 65024,
        "multi_query": True,
        "parallel_attn": True,
        "bias": False,
        "alibi": False,
        "bos_token_id": 11,
        "eos_token_id": 11,
        "auto_map": {"AutoConfig": "configuration_RW.RWConfig", "AutoModelForCausalLM": "modelling_RW.RWForCausalLM"},
    }
    d = folder_with(tmp_path, raw)
    loaded = load.build(d, raw)  # no --trust-remote-code needed for the config
    cfg = loaded.config
    assert type(cfg).__name__ == "RWConfig" and loaded.remote_code is None
    assert (cfg.num_attention_heads, cfg.num_hidden_layers, cfg.head_dim) == (71, 32, 64)
    # ... but vLLM dropped the RW model class: the error says until which version
    with pytest.raises(UnsupportedError, match=r"RWForCausalLM was supported in vLLM until v0\.28\.0"):
        run(d)


def test_C07_mistral_with_layer_types_is_ministral(tmp_path):
    raw = dict(
        LLAMA,
        model_type="mistral",
        architectures=["MistralForCausalLM"],
        sliding_window=1024,
        layer_types=["sliding_attention", "full_attention"],
    )
    out, _ = run(folder_with(tmp_path, raw))
    assert out["model_type"] == "ministral"
    assert {"rule": "model_type", "field": "model_type", "before": "mistral", "after": "ministral"}.items() <= out[
        "patches"
    ][0].items()


def test_C08_missing_architectures_falls_back_to_base_class(tmp_path):
    raw = {k: v for k, v in LLAMA.items() if k != "architectures"}
    out, _ = run(folder_with(tmp_path, raw))
    assert out["architectures"] == ["LlamaModel"]
    assert out["implementation"]["impl"] == "native" and out["implementation"]["architecture"] == "LlamaModel"
    assert "architectures fallback" in [p["rule"] for p in out["patches"]]


def test_C09_missing_architectures_without_default_class(tmp_path):
    raw = {"model_type": "RefinedWebModel", "hidden_size": 64, "n_head": 4, "n_layer": 2}
    with pytest.raises(InvalidModelError, match="architectures"):
        run(folder_with(tmp_path, raw))


def test_C10_torch_dtype_becomes_dtype(tmp_path):
    out, _ = run(folder_with(tmp_path, dict(LLAMA, torch_dtype="bfloat16")))
    assert out["dtype"]["config"] == "bfloat16" and out["config"]["dtype"] == "bfloat16"
    assert [p for p in out["patches"] if p["rule"] == "torch_dtype->dtype"][0]["before"] == "bfloat16"


def test_C11_llm_config_becomes_text_config():
    llm = SimpleNamespace(num_attention_heads=4)
    cfg = SimpleNamespace(llm_config=llm, text_config=None, architectures=["X"], model_type="x")
    loaded = load.Loaded(config=cfg)
    load._post_parse(cfg, {}, loaded)
    assert cfg.text_config is llm and loaded.patches[0]["rule"] == "llm_config->text_config"


# ---- RoPE and sliding-window details on real config classes -------------------------------------------


def test_L13_rotary_emb_base_does_not_override_llama_theta(tmp_path):
    out, warnings = run(folder_with(tmp_path, dict(LLAMA, rotary_emb_base=500000)))
    assert out["spec"]["rope"]["rope_theta"] == 10000.0  # as vLLM with transformers 5: setdefault only
    assert "R1 theta alias" in [p["rule"] for p in out["patches"]]
    assert any("not used" in w for w in warnings)


def test_L01_linear_rope_on_llama_config(tmp_path):
    out, _ = run(folder_with(tmp_path, dict(LLAMA, rope_scaling={"type": "linear", "factor": 4})))
    assert out["max_model_len"] == 16384 and out["derived_max_model_len"] == 16384
    assert out["config"]["rope_parameters"]["rope_type"] == "linear"
    assert out["config"]["rope_parameters"]["type"] == "linear"


def test_L08_conflict_on_llama_config(tmp_path):
    with pytest.raises(InvalidModelError, match="conflicting"):
        run(folder_with(tmp_path, dict(LLAMA, rope_scaling={"type": "linear", "rope_type": "dynamic", "factor": 2})))


def test_L12_telechat_yarn_on_llama_config(tmp_path):
    out, _ = run(folder_with(tmp_path, dict(LLAMA, rope_scaling={"rope_type": "telechat3-yarn", "factor": 4})))
    rp = out["spec"]["rope"]
    assert rp["rope_type"] == "yarn" and rp["attention_factor"] == pytest.approx(1.0970406, abs=1e-6)
    assert out["max_model_len"] == 4096


def test_L21_sliding_window_zero_means_none(tmp_path):
    raw = dict(
        LLAMA,
        model_type="mistral",
        architectures=["MistralForCausalLM"],
        max_position_embeddings=32768,
        sliding_window=0,
    )
    out, _ = run(folder_with(tmp_path, raw))
    assert out["max_model_len"] == 32768 and out["spec"]["sliding_window"] is None
    assert "sliding_window 0" in [p["rule"] for p in out["patches"]]


def test_hf_overrides_are_applied_and_recorded(tmp_path):
    out, _ = run(folder_with(tmp_path, LLAMA), hf_overrides='{"max_position_embeddings": 8192}')
    assert out["max_model_len"] == 8192 and out["config"]["max_position_embeddings"] == 8192
    assert {
        "rule": "hf_overrides",
        "field": "max_position_embeddings",
        "before": 4096,
        "after": 8192,
        "why": "--hf-overrides",
    } in out["patches"]


def test_hf_overrides_of_the_wrong_type_are_usage_errors(tmp_path):
    """transformers' strict fields reject a string layer count: one UsageError line, not an internal error."""
    with pytest.raises(UsageError, match='--hf-overrides num_hidden_layers="x"'):
        run(folder_with(tmp_path, LLAMA), hf_overrides='{"num_hidden_layers": "x"}')


def test_non_numeric_rope_theta_is_invalid_model(tmp_path):
    """A rope value launch reads as a number is refused at configure, not as a crash at launch."""
    with pytest.raises(InvalidModelError, match="rope_theta='x'"):
        run(folder_with(tmp_path, LLAMA), hf_overrides='{"rope_parameters": {"rope_theta": "x"}}')


# ---- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON list, not an object"),
        (json.dumps({"hidden_size": 64}), "neither 'model_type' nor 'architectures'"),
        (json.dumps(dict(LLAMA, num_attention_heads=0)), "num_attention_heads=0"),
        (json.dumps(dict(LLAMA, hidden_size=66, head_dim=None)), "not (divisible|a multiple)"),
        (json.dumps(dict(LLAMA, num_key_value_heads=3)), "num_key_value_heads=3"),
        (json.dumps(dict(LLAMA, architectures="LlamaForCausalLM")), "must be a list"),
    ],
)
def test_bad_config_is_invalid_model(tmp_path, text, match):
    with pytest.raises(InvalidModelError, match=match) as e:
        run(folder_with(tmp_path, text))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"dtype": "fp8"}, "--dtype"),
        ({"max_model_len": "1.5K"}, "--max-model-len"),
        ({"model_impl": "vllm2"}, "--model-impl"),
        ({"hf_overrides": "[1]"}, "--hf-overrides"),
        ({"hf_overrides": "{x"}, "--hf-overrides"),
    ],
)
def test_bad_flags_are_usage_errors(params, match):
    with pytest.raises(UsageError, match=match):
        ConfigureStage().inputs(params, {})


def test_inputs_are_normalized():
    inputs = ConfigureStage().inputs(
        {"dtype": "half", "max_model_len": "1K", "model_impl": "vllm", "hf_overrides": '{"a": 1}'}, {}
    )
    assert inputs == {
        "trust_remote_code": False,
        "dtype": "float16",
        "max_model_len": 1024,
        "model_impl": "native",
        "disable_sliding_window": False,
        "hf_overrides": {"a": 1},
        "allow_long_max_model_len": False,
    }


# ---- remote code (auto_map only): local folder and hub at the pinned commit ---------------------------


def test_remote_code_card_internlm2_local(tmp_path):
    d = tmp_path / "internlm2"
    d.mkdir()
    shutil.copy(CARDS / "internlm2-chat-7b.json", d / "config.json")
    (d / "configuration_internlm2.py").write_text(REMOTE_CONFIG_PY)
    with pytest.raises(UntrustedCodeError, match="configuration_internlm2.InternLM2Config"):
        run(d)
    out, _ = run(d, trust_remote_code=True)
    assert out["config_class"] == "remote:configuration_internlm2.InternLM2Config"
    assert out["model_type"] == "internlm2"
    assert out["max_model_len"] == 65536  # dynamic rope factor 2 on 32768 (L-02)
    assert out["spec"]["rope"]["rope_type"] == "dynamic" and out["spec"]["rope"]["rope_theta"] == 1000000
    # the repo's modeling code is not in the folder: prestage's Transformers backend has no class to build, while
    # vLLM registers InternLM2ForCausalLM itself: configure accepts it, for vLLM only
    assert out["implementation"] == {"architecture": "InternLM2ForCausalLM", "impl": "none", "class": ""}
    assert out["engines"] == {"prestage": "none", "vllm": "yes", "vllm_how": "vllm:internlm2.InternLM2ForCausalLM"}
    assert out["spec"]["param_count"] is None
    out, warnings = run(d, trust_remote_code=True, model_impl="native")
    assert out["engines"]["vllm"] == "yes" and out["implementation"]["impl"] == "none"
    assert any("prestage's engine has no InternLM2ForCausalLM" in w and "--engine vllm" in w for w in warnings)


def test_remote_code_fetched_from_hub_at_pinned_commit(tmp_path, hub, hf_env, prestage, artifacts_dir):
    files = {
        "config.json": json.dumps(CUSTOM).encode(),
        "configuration_x.py": CUSTOM_PY.encode(),
        "modeling_x.py": MODELING_PY.encode(),
    }
    sha = hub.commit("test-org/remote-x", files, message="remote code")
    r = prestage(["--artifacts", artifacts_dir, "--run", "rx", "resolve", "test-org/remote-x"], env=hf_env)
    assert r.rc == 0, r
    r = prestage(["--artifacts", artifacts_dir, "configure", "rx"], env=hf_env)
    assert r.rc == 8 and "--trust-remote-code" in r.stderr and "Traceback" not in r.stderr, r
    r = prestage(["--artifacts", artifacts_dir, "configure", "rx", "--trust-remote-code"], env=hf_env)
    assert r.rc == 0, r
    m = manifest.read(artifacts_dir / "rx" / "configure.msgpack")
    rc = m.outputs["remote_code"]
    assert (rc["repo_id"], rc["commit"]) == ("test-org/remote-x", sha)
    assert [f["path"] for f in rc["files"]] == ["configuration_x.py", "modeling_x.py"]  # the model code too
    assert all(f["sha256"] for f in rc["files"])
    assert m.inputs["trust_remote_code"] is True and m.outputs["implementation"]["impl"] == "transformers"


# ---- CLI end to end on a real tiny checkpoint --------------------------------------------------------


def test_cli_configure_tiny_checkpoint(checkpoint_dirs, prestage, artifacts_dir):
    r = prestage(["--artifacts", artifacts_dir, "--run", "t", "resolve", checkpoint_dirs["single"]])
    assert r.rc == 0, r
    r = prestage(["--artifacts", artifacts_dir, "configure", "t", "--max-model-len", "1K", "--json"])
    assert r.rc == 0, r
    doc = json.loads(r.stdout)
    out = doc["outputs"]
    assert out["implementation"]["impl"] == "native" and out["max_model_len"] == 1024
    assert out["dtype"]["config"] == "float32" and out["dtype"]["gpu"] == "bfloat16"
    assert out["spec"]["param_count"] and out["spec"]["attention_bias"] is True  # tiny Qwen2
    assert doc["inputs"]["max_model_len"] == 1024
    # the same inputs again: cached, manifest untouched
    before = (artifacts_dir / "t" / "configure.msgpack").read_bytes()
    r = prestage(["--artifacts", artifacts_dir, "configure", "t", "--max-model-len", "1K"])
    assert r.rc == 0 and (artifacts_dir / "t" / "configure.msgpack").read_bytes() == before


@pytest.mark.parametrize(
    "config,flags,code",
    [
        ("{broken", [], 9),
        (json.dumps(CUSTOM), [], 8),
        (json.dumps(dict(LLAMA, architectures=["FooForCausalLM"])), [], 7),
        (json.dumps(LLAMA), ["--dtype", "fp8"], 2),
        (json.dumps(LLAMA), ["--max-model-len", "8192"], 2),
    ],
)
def test_cli_errors_are_one_line_with_exit_code(tmp_path, prestage, artifacts_dir, config, flags, code):
    d = folder_with(tmp_path, config)
    r = prestage(["--artifacts", artifacts_dir, "--run", "e", "resolve", d])
    assert r.rc == 0, r
    r = prestage(["--artifacts", artifacts_dir, "configure", "e", *flags])
    assert r.rc == code, r
    assert "Traceback" not in r.stderr and "prestage: error:" in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("prestage: error:")]
    assert len(errors) == 1


# ---- Mistral format (params.json, §2.9) ----------------------------------------------------------------


def test_mistral_format_params_json(tmp_path):
    d = tmp_path / "mistral-7b-v0.3"
    d.mkdir()
    params = {
        "dim": 4096,
        "n_layers": 32,
        "head_dim": 128,
        "hidden_dim": 14336,
        "n_heads": 32,
        "n_kv_heads": 8,
        "norm_eps": 1e-05,
        "vocab_size": 32768,
        "rope_theta": 1000000.0,
    }
    (d / "params.json").write_text(json.dumps(params))
    header = json.dumps({"w": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}).encode()
    import struct

    (d / "consolidated.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    record, warnings = configure(d, "params.json", ConfigureStage().inputs({}, {}))
    out = record.to_dict()
    assert out["architectures"] == ["MistralForCausalLM"] and out["implementation"]["impl"] == "native"
    assert out["spec"]["param_count"] == 7_248_023_552  # Mistral-7B-v0.3
    assert (out["spec"]["hidden_size"], out["spec"]["num_key_value_heads"], out["spec"]["rms_norm_eps"]) == (
        4096,
        8,
        1e-05,
    )
    assert out["spec"]["rope"]["rope_theta"] == 1000000.0
    assert out["max_model_len"] == 128000 and any("128000" in w for w in warnings)
    assert out["dtype"]["config"] == "bfloat16"  # from the consolidated.safetensors header


# ---- the configure store (memo.py) ---------------------------------------------------------------------


def test_memo_key_follows_content_and_inputs(tmp_path):
    from prestage.stages.configure import memo

    d = folder_with(tmp_path, LLAMA)
    inputs = ConfigureStage().inputs({}, {})
    k = memo.key(d, "config.json", inputs, 1, (8, 0))
    assert k == memo.key(d, "config.json", dict(inputs), 1, (8, 0))
    assert k != memo.key(d, "config.json", dict(inputs, dtype="float32"), 1, (8, 0))
    assert memo.key(d, "config.json", dict(inputs, trust_remote_code=True), 1, (8, 0)) is None
    (d / "model.safetensors").write_bytes(struct_header("F16"))
    k2 = memo.key(d, "config.json", inputs, 1, (8, 0))
    (d / "model.safetensors").write_bytes(struct_header("BF16"))  # the dtype source changed
    assert len({k, k2, memo.key(d, "config.json", inputs, 1, (8, 0))}) == 3
    (d / "config.json").write_text(json.dumps(dict(LLAMA, max_position_embeddings=2048)))
    assert memo.key(d, "config.json", inputs, 1, (8, 0)) not in {k, k2}
    record, _ = configure(d, "config.json", inputs)
    memo.save(tmp_path / "cache", "abc", record, ["w"])
    assert memo.load(tmp_path / "cache", "abc") == (record, ["w"])
    entry = tmp_path / "cache" / ".prestage" / "configure" / "abc.msgpack"
    doc = msgpack.unpackb(entry.read_bytes())
    doc["outputs"]["max_model_len"] = "4096"  # an entry of another shape is a miss, never a wrong value
    entry.write_bytes(msgpack.packb(doc))
    assert memo.load(tmp_path / "cache", "abc") is None
    (tmp_path / "cache" / ".prestage" / "configure" / "abc.msgpack").write_bytes(b"\x93garbage")
    assert memo.load(tmp_path / "cache", "abc") is None


def struct_header(st_dtype: str) -> bytes:
    import struct

    header = json.dumps({"w": {"dtype": st_dtype, "shape": [1], "data_offsets": [0, 2]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0\0"


def test_memo_new_run_of_same_model_reuses_result(tmp_path, prestage, artifacts_dir):
    d = folder_with(tmp_path, dict(LLAMA, rope_scaling={"type": "linear", "factor": 2}), name="memo-model")
    env = dict(__import__("os").environ, HF_HUB_CACHE=str(tmp_path / "hf-cache"))
    for run in ("a", "b"):
        assert prestage(["--artifacts", artifacts_dir, "--run", run, "resolve", d], env=env).rc == 0
        r = prestage(["--artifacts", artifacts_dir, "configure", run], env=env)
        assert r.rc == 0, r
    a = manifest.read(artifacts_dir / "a" / "configure.msgpack")
    b = manifest.read(artifacts_dir / "b" / "configure.msgpack")
    assert (a.volatile["memo"], b.volatile["memo"]) == ("stored", "hit")
    assert a.outputs == b.outputs and a.warnings == b.warnings and b.outputs["max_model_len"] == 8192
