"""Architecture registry: which implementation runs a config's `architectures` (vLLM's registry, docs/vllm-rules.md §3).

Importable without torch or transformers: configure uses it to decide, launch uses it to import the class.

- `NATIVE`: architectures prestage implements itself (one shared decoder module).
- `TRANSFORMERS_SUPPORTED`: architectures vLLM 0.33 routes to its Transformers backend by table.
- `PREVIOUSLY_SUPPORTED` / `OUT_OF_TREE`: names vLLM dropped, kept so the error says so.
- `SUFFIX_DEFAULTS`: architecture-name suffix -> runner (generate | pooling) and convert type.
- `resolve(architectures, model_impl, transformers_has)`: the choice, or a one-line error.

`transformers_has(arch)` is a callable the caller supplies ("can transformers build this class?"), so this
module never imports transformers itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prestage.stages.errors import UnsupportedError

DECODER = "prestage.stages.launch.models.decoder:DecoderForCausalLM"
TRANSFORMERS_BACKEND = "prestage.stages.launch.hf_backend:TransformersForCausalLM"

# Native decoder families. vLLM also maps the base-model names (`LlamaModel`, ...) to the causal-LM class:
# a config without `architectures` gets `[<Family>Model]` from transformers' MODEL_MAPPING_NAMES (C-08).
NATIVE: dict[str, str] = {
    name: DECODER
    for name in (
        "LlamaForCausalLM",
        "LLaMAForCausalLM",
        "LlamaModel",
        "MistralForCausalLM",
        "MistralModel",
        "Qwen2ForCausalLM",
        "Qwen2Model",
        "Qwen3ForCausalLM",
        "Qwen3Model",
    )
}

# vLLM 0.33 `_TRANSFORMERS_SUPPORTED_MODELS`: registered, but run by the Transformers backend (M-04).
TRANSFORMERS_SUPPORTED: tuple[str, ...] = (
    "ArceeForCausalLM",
    "CwmForCausalLM",
    "GlmForCausalLM",
    "GPTBigCodeForCausalLM",
    "GPTNeoXForCausalLM",
    "HunYuanDenseV1ForCausalLM",
    "Jais2ForCausalLM",
    "NanbeigeForCausalLM",
    "OlmoForCausalLM",
    "Olmo2ForCausalLM",
    "Olmo3ForCausalLM",
    "PhiForCausalLM",
    "SeedOssForCausalLM",
    "SmolLM3ForCausalLM",
    "Starcoder2ForCausalLM",
    "VaultGemmaForCausalLM",
    # vLLM sends these to TransformersMoEForCausalLM; prestage has one backend class for both.
    "FlexOlmoForCausalLM",
    "HunYuanMoEV1ForCausalLM",
    "Kolibri1ForCausalLM",
    "MellumForCausalLM",
)

# Architecture names that already are backend classes (vLLM `_TRANSFORMERS_BACKEND_MODELS`, generate only).
BACKEND_NAMES: tuple[str, ...] = (
    "TransformersForCausalLM",
    "TransformersMoEForCausalLM",
    "TransformersMultiModalForCausalLM",
    "TransformersMultiModalMoEForCausalLM",
)

# vLLM `_PREVIOUSLY_SUPPORTED_MODELS`: architecture -> last vLLM version that ran it (M-02).
PREVIOUSLY_SUPPORTED: dict[str, str] = {
    "AquilaForCausalLM": "0.24.0",
    "AquilaModel": "0.24.0",
    "ArcticForCausalLM": "0.28.0",
    "BaichuanForCausalLM": "0.23.0",
    "BaiChuanForCausalLM": "0.23.0",
    "JAISLMHeadModel": "0.22.0",
    "MiniMaxText01ForCausalLM": "0.23.0",
    "MPTForCausalLM": "0.28.0",
    "MptForCausalLM": "0.28.0",
    "PersimmonForCausalLM": "0.25.0",
    "QWenLMHeadModel": "0.23.0",
    "RWForCausalLM": "0.28.0",
}

# vLLM `_OOT_SUPPORTED_MODELS`: architecture -> plugin that runs it now (M-03).
_BART_PLUGIN = "https://github.com/vllm-project/bart-plugin"
OUT_OF_TREE: dict[str, str] = {
    "BartModel": _BART_PLUGIN,
    "BartForConditionalGeneration": _BART_PLUGIN,
    "MBartForConditionalGeneration": _BART_PLUGIN,
    "Florence2ForConditionalGeneration": _BART_PLUGIN,
    "Nemotron3_5AsrForRNNT": "https://github.com/vllm-project/vllm-nemotron-asr-plugin",
}

# vLLM `_SUFFIX_TO_DEFAULTS` (earlier entries win): suffix -> (runner, convert).
SUFFIX_DEFAULTS: tuple[tuple[str, str, str], ...] = (
    ("ForCausalLM", "generate", "none"),
    ("ForConditionalGeneration", "generate", "none"),
    ("ChatModel", "generate", "none"),
    ("LMHeadModel", "generate", "none"),
    ("ForTextEncoding", "pooling", "embed"),
    ("EmbeddingModel", "pooling", "embed"),
    ("ForRewardModeling", "pooling", "embed"),
    ("RewardModel", "pooling", "embed"),
    ("Model", "pooling", "embed"),
    ("ForSequenceClassification", "pooling", "classify"),
    ("ForTokenClassification", "pooling", "classify"),
    ("ForAudioClassification", "pooling", "classify"),
    ("ForImageClassification", "pooling", "classify"),
    ("ForVideoClassification", "pooling", "classify"),
    ("ClassificationModel", "pooling", "classify"),
)

MODEL_IMPLS = ("auto", "native", "transformers")


@dataclass(frozen=True)
class Implementation:
    architecture: str  # the name from the config that was matched
    impl: str  # "native" | "transformers"
    cls: str  # "module:Class" that launch imports
    warning: str | None = None  # vLLM's "falling back to Transformers" notice, when it applies

    def as_dict(self) -> dict:
        return {"architecture": self.architecture, "impl": self.impl, "class": self.cls}


def suffix_defaults(arch: str) -> tuple[str, str] | None:
    """(runner, convert) that vLLM infers from the architecture name's suffix, or None."""
    for suffix, runner, convert in SUFFIX_DEFAULTS:
        if arch.endswith(suffix):
            return runner, convert
    return None


def _normalize(arch: str) -> str | None:
    """vLLM `_normalize_arch` for the generate runner: a registered name, or FooForX -> FooForCausalLM."""
    if arch in NATIVE:
        return arch
    for suffix, _, _ in SUFFIX_DEFAULTS:
        if arch.endswith(suffix):
            candidate = arch[: -len(suffix)] + "ForCausalLM"
            return candidate if candidate in NATIVE else None
    return None


def supported_summary() -> str:
    natives = ", ".join(sorted(n for n in NATIVE if n.endswith("ForCausalLM")))
    return f"native: {natives}; plus any causal LM transformers knows (--model-impl auto|transformers)"


def runner_of(architectures: list[str]) -> tuple[str, str]:
    """(runner, convert) vLLM's `--runner auto` picks: a registered causal LM generates, else the suffix says."""
    first = architectures[0]
    if first in NATIVE or first in BACKEND_NAMES:
        return "generate", "none"
    return suffix_defaults(first) or ("generate", "none")


def resolve(
    architectures: list[str], model_impl: str = "auto", transformers_has: Callable[[str], bool] = lambda a: False
) -> Implementation:
    """Pick the implementation for `architectures`, as vLLM's registry does (§3.2/3.3).

    `model_impl`: "auto" (native first, else the Transformers backend), "native" (never the backend; vLLM's
    "vllm"), "transformers" (always the backend). `transformers_has(arch)` says whether transformers can build
    `arch` (a class of that name in transformers, or an `auto_map` AutoModelForCausalLM entry with trust).
    """
    if model_impl not in MODEL_IMPLS:
        raise UnsupportedError(f"--model-impl {model_impl!r} is not one of {', '.join(MODEL_IMPLS)}")
    if not architectures:
        raise UnsupportedError(
            "no model architectures are specified in config.json; add 'architectures' "
            'or pass --hf-overrides \'{"architectures": ["...ForCausalLM"]}\''
        )
    runner, convert = runner_of(architectures)
    if runner == "pooling":
        # vLLM would run it with its pooling runner (e.g. as_seq_cls_model(LlamaForCausalLM), M-09).
        raise UnsupportedError(
            f"architecture {architectures[0]} is a pooling model (vLLM runner 'pooling', convert '{convert}'); "
            "prestage runs text generation only; use a checkpoint whose architecture is a *ForCausalLM"
        )
    if model_impl == "transformers":
        return _via_transformers(architectures[0], transformers_has, strict=True)
    for arch in architectures:
        if arch in BACKEND_NAMES:
            return Implementation(arch, "transformers", TRANSFORMERS_BACKEND)
        if arch in TRANSFORMERS_SUPPORTED and model_impl == "auto":
            return _via_transformers(arch, transformers_has, strict=True)
        name = _normalize(arch)
        if name is not None:
            return Implementation(arch, "native", NATIVE[name])
    if model_impl == "auto":
        for arch in architectures:
            found = _via_transformers(arch, transformers_has, strict=False)
            if found is not None:
                return found
    _raise_unsupported(architectures, model_impl)
    raise AssertionError("unreachable")


def _via_transformers(arch: str, transformers_has: Callable[[str], bool], strict: bool) -> Implementation | None:
    if arch in BACKEND_NAMES:
        return Implementation(arch, "transformers", TRANSFORMERS_BACKEND)
    if transformers_has(arch):
        warning = None
        if arch not in TRANSFORMERS_SUPPORTED and arch not in NATIVE:
            warning = (
                f"{arch} has no native prestage implementation, falling back to the Transformers "
                "implementation; some features may not be supported and performance may not be optimal"
            )
        return Implementation(arch, "transformers", TRANSFORMERS_BACKEND, warning)
    if not strict:
        return None
    raise UnsupportedError(
        f"cannot find a model class for '{arch}': it is not a model class in the installed transformers and "
        "'AutoModelForCausalLM' is not in the config's auto_map (with --trust-remote-code); "
        f"supported: {supported_summary()}"
    )


def _raise_unsupported(architectures: list[str], model_impl: str) -> None:
    for arch in architectures:
        if arch in PREVIOUSLY_SUPPORTED:
            raise UnsupportedError(
                f"model architecture {arch} was supported in vLLM until v{PREVIOUSLY_SUPPORTED[arch]}, and is not "
                "supported anymore; use an older vLLM, or a checkpoint converted to a supported architecture"
            )
    for arch in architectures:
        if arch in OUT_OF_TREE:
            raise UnsupportedError(
                f"model architecture {arch} is not supported in-tree anymore; install the plugin at "
                f"{OUT_OF_TREE[arch]} (vLLM) to run it; prestage does not run it"
            )
    hint = "" if model_impl == "auto" else " (with --model-impl auto, any causal LM transformers knows also runs)"
    raise UnsupportedError(
        f"model architectures {list(architectures)} are not supported for now; supported: {supported_summary()}{hint}"
    )
