"""The configure stage: build the model's config, patch it as vLLM does, and decide what runs it (seed steps 2-5).

Reads resolve's manifest and the config file it recorded (config.json, or params.json for Mistral format), and
never the network, except to fetch a trusted remote-code .py at the commit resolve pinned. Writes:
the patched config as plain data and every patch made, max_model_len, the dtype for a CUDA sm>=80 GPU and for
the CPU fallback, the implementation (native decoder or the Transformers backend) and the `spec` that
fetch-weights and launch read instead of config.json.

Modules: load.py (reading and building the config), configs.py (prestage's own config classes), mistral.py
(params.json), rope.py (RoPE patches), maxlen.py, dtype.py, spec.py, memo.py (content-addressed results, so a
new run of an already-configured model does not pay the transformers import); the architecture table is
stages/launch/registry.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages import errors, hub
from stages.base import Context, Stage, StageResult, opt
from stages.configure import dtype as dtypes
from stages.configure import maxlen
from stages.manifest import Manifest

GPU_CAPABILITY = (8, 0)  # the GPU launch targets: CUDA sm>=80 (A100/H100)

OPTIONS = (
    opt("--trust-remote-code", is_flag=True, default=False,
        help="Allow the repo's own Python code (auto_map) to run to build the config / model."),
    opt("--dtype", type=str, default="auto", metavar="auto|half|float16|bfloat16|float|float32",
        help="Weights and activations dtype; auto: the checkpoint's, float32 checkpoints as bfloat16 on GPU."),
    opt("--max-model-len", type=str, default=None, metavar="N|auto",
        help="Context length: 4096, 4k (=4000), 4K (=4096), 25.6k, or auto/-1 (derived from the config)."),
    opt("--model-impl", type=str, default="auto", metavar="auto|native|transformers",
        help="auto: prestage's native decoder when it has one, else the Transformers backend."),
    opt("--disable-sliding-window", is_flag=True, default=False,
        help="Turn sliding-window attention off and cap max_model_len to the window."),
    opt("--hf-overrides", type=str, default=None, metavar="JSON",
        help="JSON object of config fields to override, e.g. '{\"max_position_embeddings\": 8192}'."),
)


def _model_impl(value: str | None) -> str:
    v = (value or "auto").strip().lower()
    v = {"vllm": "native"}.get(v, v)  # vLLM's name for its own implementations
    from stages.launch.registry import MODEL_IMPLS

    if v not in MODEL_IMPLS:
        raise errors.UsageError(f"--model-impl {value!r}: use one of {', '.join(MODEL_IMPLS)}")
    return v


def _hf_overrides(value) -> dict:
    if value in (None, ""):
        return {}
    if isinstance(value, dict):
        return value
    try:
        data = json.loads(value)
    except ValueError as e:
        raise errors.UsageError(f"--hf-overrides is not valid JSON ({e}); pass a JSON object") from None
    if not isinstance(data, dict):
        raise errors.UsageError(f"--hf-overrides must be a JSON object, got a {type(data).__name__}")
    return data


def _plain_config(d):
    """A config dict as manifest-safe plain data (dtype objects and other leftovers as strings)."""
    if isinstance(d, dict):
        return {str(k): _plain_config(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain_config(v) for v in d]
    if d is None or isinstance(d, (bool, int, float, str)):
        return d
    s = str(d)
    return s[len("torch."):] if s.startswith("torch.") else s


class ConfigureStage(Stage):
    name = "configure"
    version = 1
    requires = ("resolve",)
    options = OPTIONS

    def inputs(self, params: dict, upstream: dict[str, Manifest]) -> dict:
        return {
            "trust_remote_code": bool(params.get("trust_remote_code")),
            "dtype": dtypes.normalize_requested(params.get("dtype")),
            "max_model_len": maxlen.parse_max_model_len(params.get("max_model_len")),
            "model_impl": _model_impl(params.get("model_impl")),
            "disable_sliding_window": bool(params.get("disable_sliding_window")),
            "hf_overrides": _hf_overrides(params.get("hf_overrides")),
            # vLLM's escape hatch for a max_model_len above the model's own (L-19); it changes the outcome
            "allow_long_max_model_len": hub.env_true("VLLM_ALLOW_LONG_MAX_MODEL_LEN"),
        }

    def run(self, ctx: Context, inputs: dict) -> StageResult:
        from stages.configure import memo

        res = ctx.upstream["resolve"].outputs
        folder = hub.model_dir(ctx.run_dir, res, ctx.params)
        config_file = res.get("config_file") or "config.json"
        hub_source = {"repo_id": res.get("repo_id"), "commit": res.get("commit")} if res.get("source") == "hub" \
            else None
        cache_dir = hub.settings(ctx.params).cache_dir
        key = memo.key(folder, config_file, inputs, self.version, GPU_CAPABILITY)
        found = memo.load(cache_dir, key) if key else None
        if found is not None:
            outputs, warnings = found
        else:
            outputs, warnings = configure(folder, config_file, inputs, hub_source=hub_source, params=ctx.params)
            if key:
                memo.save(cache_dir, key, outputs, warnings)
        ctx.reporter.info(f"configure: {outputs['architectures'][0] if outputs['architectures'] else '?'} -> "
                          f"{outputs['implementation']['impl']}, max_model_len {outputs['max_model_len']}, "
                          f"dtype {outputs['dtype']['gpu']} (GPU) / {outputs['dtype']['cpu']} (CPU)"
                          + (" (from the configure store)" if found is not None else ""))
        return StageResult(outputs=outputs, warnings=warnings,
                           volatile={"model_dir": str(folder),
                                     "memo": "hit" if found is not None else ("stored" if key else "off")})


def configure(folder: Path, config_file: str, inputs: dict, *, hub_source: dict | None = None,
              params: dict | None = None, capability: tuple[int, int] = GPU_CAPABILITY) -> tuple[dict, list]:
    """The whole stage on a model folder: returns (outputs, warnings). Drives every step below."""
    from stages.configure import load, rope
    from stages.configure import spec as specs
    from stages.launch import registry

    folder = Path(folder)
    pre_warnings: list[str] = []
    raw = load.read_json(folder, config_file)
    if config_file == "params.json":
        from stages.configure import mistral

        hf = load.read_json(folder, "config.json") if (folder / "config.json").is_file() else None
        raw, pre_warnings = mistral.params_to_hf(raw, hf)
    trust = inputs["trust_remote_code"]
    loaded = load.build(folder, raw, config_file=config_file, trust_remote_code=trust,
                        hf_overrides=inputs["hf_overrides"], hub_source=hub_source, params=params,
                        extra_warnings=pre_warnings)
    config, patches, warnings = loaded.config, loaded.patches, loaded.warnings
    rope.patch_all(config, patches, warnings)

    text = config.get_text_config()
    if getattr(text, "num_attention_heads", None) is None:
        raise errors.InvalidModelError(f"{config_file}: the text config has no num_attention_heads; it does not "
                                       "describe a decoder prestage can run")
    disable_sw = inputs["disable_sliding_window"]
    if getattr(text, "sliding_window", None) == 0:  # L-21: a window of 0 means none
        text.sliding_window = None
        disable_sw = True
        patches.append({"rule": "sliding_window 0", "field": "sliding_window", "before": 0, "after": None,
                        "why": "a sliding window of 0 means no sliding window"})
    ml = maxlen.resolve_max_model_len(text, inputs["max_model_len"], disable_sliding_window=disable_sw,
                                      allow_long=inputs["allow_long_max_model_len"])
    warnings.extend(ml.warnings)
    if disable_sw and getattr(text, "sliding_window", None) is not None:
        patches.append({"rule": "disable sliding window", "field": "sliding_window", "before": text.sliding_window,
                        "after": None, "why": "--disable-sliding-window"})
        text.sliding_window = None

    architectures = getattr(config, "architectures", None) or []
    if not isinstance(architectures, (list, tuple)) or not all(isinstance(a, str) for a in architectures):
        raise errors.InvalidModelError(f"{config_file} architectures={architectures!r}: must be a list of class "
                                       "names, e.g. [\"LlamaForCausalLM\"]")
    architectures = list(architectures)
    impl = registry.resolve(architectures, inputs["model_impl"],
                            lambda a: load.transformers_can_build(a, config, trust))
    if impl.warning:
        warnings.append(impl.warning)

    model_type = getattr(text, "model_type", None) or config.model_type
    cfg_dtype, dtype_source = dtypes.config_dtype(config, folder)
    gpu, gpu_note = dtypes.resolve_dtype(model_type, cfg_dtype, inputs["dtype"], capability)
    cpu, cpu_note = dtypes.cpu_dtype(inputs["dtype"])
    notes = [f"checkpoint dtype {cfg_dtype} (from {dtype_source})",
             f"GPU (CUDA sm>={capability[0]}{capability[1]}): {gpu}" + (f", {gpu_note}" if gpu_note else ""),
             cpu_note]

    native = impl.impl == "native"
    spec = specs.build_spec(text, native=native, weight_dtype=gpu,
                            sliding_window=getattr(text, "sliding_window", None))
    if not native:
        count = specs.count_params_meta(config, trust)
        spec["param_count"] = count
        spec["weight_bytes"] = count * specs.DTYPE_BYTES[gpu] if count else None

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
        "dtype": {"config": cfg_dtype, "requested": inputs["dtype"], "gpu": gpu, "cpu": cpu,
                  "note": "; ".join(notes)},
        "implementation": impl.as_dict(),
        "spec": _plain_config(spec),
        "trust_remote_code": trust,
        "remote_code": loaded.remote_code,
    }
    return outputs, warnings
