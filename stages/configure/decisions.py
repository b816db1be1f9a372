"""configure's decisions on a model folder: config class and patches, max_model_len, dtype, implementation, spec.

`configure(folder, config_file, inputs)` drives every step (hf_config.py builds the config, rope.py patches
RoPE, maxlen.py and dtype.py decide, registry.py picks the implementation, spec.py summarizes the shapes) and
returns (outputs, warnings). The stage (stage.py) adds the configure store (memo.py) around it.
"""

from __future__ import annotations

from pathlib import Path

from prestage.stages import errors, safetensors
from prestage.stages.configure import dtype as dtypes
from prestage.stages.configure import maxlen
from prestage.stages.records import ConfigureRecord

GPU_CAPABILITY = (8, 0)  # the GPU launch targets: CUDA sm>=80 (A100/H100)


def _plain_config(d):
    """A config dict as manifest-safe plain data (dtype objects and other leftovers as strings)."""
    if isinstance(d, dict):
        return {str(k): _plain_config(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain_config(v) for v in d]
    if d is None or isinstance(d, (bool, int, float, str)):
        return d
    s = str(d)
    return s[len("torch.") :] if s.startswith("torch.") else s


def configure(
    folder: Path,
    config_file: str,
    inputs: dict,
    *,
    hub_source: dict | None = None,
    params: dict | None = None,
    capability: tuple[int, int] = GPU_CAPABILITY,
) -> tuple[dict, list]:
    """The whole stage on a model folder: returns (outputs, warnings). Drives every step below."""
    from prestage.stages.configure import hf_config, rope
    from prestage.stages.configure import spec as specs
    from prestage.stages.launch import registry

    folder = Path(folder)
    pre_warnings: list[str] = []
    raw = hf_config.read_json(folder, config_file)
    if config_file == "params.json":
        from prestage.stages.configure import mistral

        hf = hf_config.read_json(folder, "config.json") if (folder / "config.json").is_file() else None
        raw, pre_warnings = mistral.params_to_hf(raw, hf)
    trust = inputs["trust_remote_code"]
    loaded = hf_config.build(
        folder,
        raw,
        config_file=config_file,
        trust_remote_code=trust,
        hf_overrides=inputs["hf_overrides"],
        hub_source=hub_source,
        params=params,
        extra_warnings=pre_warnings,
    )
    config, patches, warnings = loaded.config, loaded.patches, loaded.warnings
    rope.patch_all(config, patches, warnings)

    text = config.get_text_config()
    if getattr(text, "num_attention_heads", None) is None:
        raise errors.InvalidModelError(
            f"{config_file}: the text config has no num_attention_heads; it does not "
            "describe a decoder prestage can run"
        )
    disable_sw = inputs["disable_sliding_window"]
    if getattr(text, "sliding_window", None) == 0:  # a window of 0 means none (docs/vllm-rules.md, L-21)
        text.sliding_window = None
        disable_sw = True
        patches.append(
            {
                "rule": "sliding_window 0",
                "field": "sliding_window",
                "before": 0,
                "after": None,
                "why": "a sliding window of 0 means no sliding window",
            }
        )
    ml = maxlen.resolve_max_model_len(
        text, inputs["max_model_len"], disable_sliding_window=disable_sw, allow_long=inputs["allow_long_max_model_len"]
    )
    warnings.extend(ml.warnings)
    if disable_sw and getattr(text, "sliding_window", None) is not None:
        patches.append(
            {
                "rule": "disable sliding window",
                "field": "sliding_window",
                "before": text.sliding_window,
                "after": None,
                "why": "--disable-sliding-window",
            }
        )
        text.sliding_window = None

    architectures = getattr(config, "architectures", None) or []
    if not isinstance(architectures, (list, tuple)) or not all(isinstance(a, str) for a in architectures):
        raise errors.InvalidModelError(
            f'{config_file} architectures={architectures!r}: must be a list of class names, e.g. ["LlamaForCausalLM"]'
        )
    architectures = list(architectures)
    fetch = hf_config.model_code_fetcher(folder, raw, hub_source, params, loaded)

    def can_build(arch: str, vllm_rule: bool = False) -> bool:
        return hf_config.transformers_can_build(arch, config, trust, fetch, any_class_checked=vllm_rule)

    vllm = registry.vllm_support(architectures, inputs["model_impl"], lambda a: can_build(a, True))
    try:
        impl = registry.resolve(architectures, inputs["model_impl"], can_build)
    except errors.UnsupportedError as e:
        if not vllm.runs:
            raise
        # vLLM runs it, prestage's engine does not: configure's outcome is vLLM's, launch says which engine
        impl = registry.Implementation(architectures[0], "none", "")
        del e
        warnings.append(
            f"prestage's engine has no {architectures[0]}; vLLM {registry.vllm_table.VLLM_VERSION} runs it "
            f"({vllm.how}): launch it with --engine vllm"
        )
    if impl.warning:
        warnings.append(impl.warning)

    model_type = getattr(text, "model_type", None) or config.model_type
    cfg_dtype, dtype_source = dtypes.config_dtype(config, folder)
    gpu, gpu_note = dtypes.resolve_dtype(model_type, cfg_dtype, inputs["dtype"], capability)
    cpu, cpu_note = dtypes.cpu_dtype(inputs["dtype"])
    notes = [
        f"checkpoint dtype {cfg_dtype} (from {dtype_source})",
        f"GPU (CUDA sm>={capability[0]}{capability[1]}): {gpu}" + (f", {gpu_note}" if gpu_note else ""),
        cpu_note,
    ]

    native = impl.impl == "native"
    spec = specs.build_spec(text, native=native, weight_dtype=gpu, sliding_window=getattr(text, "sliding_window", None))
    if impl.impl == "transformers":
        count = specs.count_params_meta(config, trust)
        spec["param_count"] = count
        spec["weight_bytes"] = count * safetensors.torch_itemsize(gpu) if count else None

    cfg_dict = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset"):
        cfg_dict.pop(key, None)
    outputs = {
        "config": _plain_config(cfg_dict),
        "config_class": loaded.config_class,
        "model_type": config.model_type,
        "architectures": architectures,
        "patches": _plain_config(patches),
        "max_model_len": ml.max_model_len,
        "max_model_len_key": ml.key,
        "derived_max_model_len": ml.derived,
        "dtype": {"config": cfg_dtype, "requested": inputs["dtype"], "gpu": gpu, "cpu": cpu, "note": "; ".join(notes)},
        "implementation": impl.as_dict(),
        "engines": {"prestage": impl.impl, "vllm": vllm.vllm, "vllm_how": vllm.how},
        "spec": _plain_config(spec),
        "trust_remote_code": trust,
        "remote_code": loaded.remote_code,
    }
    return ConfigureRecord.from_dict(outputs, "configure's outputs"), warnings
