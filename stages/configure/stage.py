"""The configure stage: build the model's config, patch it as vLLM does, and decide what runs it.

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

from prestage.stages import errors, hub, paths
from prestage.stages.base import Context, Stage, StageResult, opt
from prestage.stages.configure import dtype as dtypes
from prestage.stages.configure import maxlen
from prestage.stages.configure.decisions import GPU_CAPABILITY, configure
from prestage.stages.manifest import Manifest

OPTIONS = (
    opt(
        "--trust-remote-code",
        is_flag=True,
        default=False,
        help="Allow the repo's own Python code (auto_map) to run to build the config / model.",
    ),
    opt(
        "--dtype",
        type=str,
        default="auto",
        metavar="auto|half|float16|bfloat16|float|float32",
        help="Weights and activations dtype; auto: the checkpoint's, float32 checkpoints as bfloat16 on GPU.",
    ),
    opt(
        "--max-model-len",
        type=str,
        default=None,
        metavar="N|auto",
        help="Context length: 4096, 4k (=4000), 4K (=4096), 25.6k, or auto/-1 (derived from the config).",
    ),
    opt(
        "--model-impl",
        type=str,
        default="auto",
        metavar="auto|native|transformers",
        help="auto: prestage's native decoder when it has one, else the Transformers backend.",
    ),
    opt(
        "--disable-sliding-window",
        is_flag=True,
        default=False,
        help="Turn sliding-window attention off and cap max_model_len to the window.",
    ),
    opt(
        "--hf-overrides",
        type=str,
        default=None,
        metavar="JSON",
        help="JSON object of config fields to override, e.g. '{\"max_position_embeddings\": 8192}'.",
    ),
)


def _model_impl(value: str | None) -> str:
    v = (value or "auto").strip().lower()
    v = {"vllm": "native"}.get(v, v)  # vLLM's name for its own implementations
    from prestage.stages.launch.registry import MODEL_IMPLS

    if v not in MODEL_IMPLS:
        raise errors.UsageError(f"--model-impl {value!r}: not an implementation; use one of {', '.join(MODEL_IMPLS)}")
    return v


def _hf_overrides(value) -> dict:
    if value in (None, ""):
        return {}
    if isinstance(value, dict):
        return value
    try:
        data = json.loads(value)
    except ValueError as e:
        raise errors.UsageError(f"--hf-overrides {value!r}: not valid JSON ({e}); pass a JSON object") from None
    if not isinstance(data, dict):
        raise errors.UsageError(
            f"--hf-overrides {value!r}: must be a JSON object such as '{{\"max_position_embeddings\": 8192}}', "
            f"got a {type(data).__name__}"
        )
    return data


class ConfigureStage(Stage):
    name = "configure"
    version = 3  # 2: typed record (spec fields all present); 3: engines (prestage / vLLM)
    requires = ("resolve",)
    options = OPTIONS

    def check_params(self, params: dict) -> None:
        dtypes.normalize_requested(params.get("dtype"))
        maxlen.parse_max_model_len(params.get("max_model_len"))
        _model_impl(params.get("model_impl"))
        _hf_overrides(params.get("hf_overrides"))

    def inputs(self, params: dict, upstream: dict[str, Manifest]) -> dict:
        return {
            "trust_remote_code": bool(params.get("trust_remote_code")),
            "dtype": dtypes.normalize_requested(params.get("dtype")),
            "max_model_len": maxlen.parse_max_model_len(params.get("max_model_len")),
            "model_impl": _model_impl(params.get("model_impl")),
            "disable_sliding_window": bool(params.get("disable_sliding_window")),
            "hf_overrides": _hf_overrides(params.get("hf_overrides")),
            # vLLM allows a max_model_len above the derived one (docs/vllm-rules.md, L-19): it changes the outcome
            "allow_long_max_model_len": hub.env_true("VLLM_ALLOW_LONG_MAX_MODEL_LEN"),
        }

    def run(self, ctx: Context, inputs: dict) -> StageResult:
        from prestage.stages.configure import memo

        res = ctx.upstream["resolve"].record
        folder = paths.model_dir(ctx.run_dir, ctx.upstream["resolve"], ctx.params)
        hub_source = (
            {"repo_id": res.repo_id, "commit": res.commit, "files": {f.path: f.to_dict() for f in res.files}}
            if res.source == "hub"
            else None
        )
        cache_dir = hub.settings(ctx.params).cache_dir
        if hub_source is not None:  # the cached config is checked against the listing before it is read
            root = paths.cache_root(ctx.params, ctx.upstream["resolve"])
            hub.verify_cached(root, res.repo_id, res.commit, res.config_file, hub_source["files"].get(res.config_file))
        key = memo.key(folder, res.config_file, inputs, self.version, GPU_CAPABILITY)
        found = memo.load(cache_dir, key) if key else None
        if found is not None:
            record, warnings = found
        else:
            record, warnings = configure(folder, res.config_file, inputs, hub_source=hub_source, params=ctx.params)
            if key:
                memo.save(cache_dir, key, record, warnings)
        ctx.reporter.info(
            f"configure: {record.architectures[0] if record.architectures else '?'} -> "
            f"{record.implementation.impl}, max_model_len {record.max_model_len}, "
            f"dtype {record.dtype.gpu} (GPU) / {record.dtype.cpu} (CPU)"
            + (" (from the configure store)" if found is not None else "")
        )
        return StageResult(
            outputs=record,
            warnings=warnings,
            volatile={"model_dir": str(folder), "memo": "hit" if found is not None else ("stored" if key else "off")},
        )
