"""Architecture registry: which implementation runs a config's `architectures` (vLLM's registry, docs/vllm-rules.md §3).

Importable without torch or transformers: configure uses it to decide, launch uses it to import the class.

- `NATIVE`: architectures prestage implements itself (one shared decoder module).
- `TRANSFORMERS_SUPPORTED`: text architectures vLLM routes to its Transformers backend by table.
- `PREVIOUSLY_SUPPORTED` / `OUT_OF_TREE`: names vLLM dropped, kept so the error says so.
- `SUFFIX_DEFAULTS`: architecture-name suffix -> runner (generate | pooling) and convert type.
- `resolve(architectures, model_impl, transformers_has)`: prestage's engine's choice, or a one-line error.
- `vllm_support(architectures, model_impl, transformers_has)`: whether vLLM runs it, and how.

vLLM's own tables (every architecture it registers, by runner) are data in vllm_table.py: an architecture
vLLM registers decides the runner by its class, as in vLLM, before the name-suffix rule.

`transformers_has(arch)` is a callable the caller supplies ("can transformers build this class?"), so this
module never imports transformers itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prestage.stages.errors import UnsupportedError
from prestage.stages.launch import vllm_table

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

# vLLM `_TRANSFORMERS_SUPPORTED_MODELS` (text models): registered, but run by the Transformers backend (M-04).
# vLLM sends the MoE ones to TransformersMoEForCausalLM; prestage has one backend class for both.
TRANSFORMERS_SUPPORTED: tuple[str, ...] = tuple(
    a for a in vllm_table.TRANSFORMERS_SUPPORTED if a.endswith("ForCausalLM")
)

# Architecture names that already are backend classes (vLLM `_TRANSFORMERS_BACKEND_MODELS`, generate only).
BACKEND_NAMES: tuple[str, ...] = tuple(a for a in vllm_table.TRANSFORMERS_BACKEND if a.endswith("ForCausalLM"))

# vLLM `_PREVIOUSLY_SUPPORTED_MODELS`: architecture -> last vLLM version that ran it (M-02).
PREVIOUSLY_SUPPORTED: dict[str, str] = dict(vllm_table.PREVIOUSLY_SUPPORTED)

# vLLM `_OOT_SUPPORTED_MODELS`: architecture -> plugin that runs it now (M-03).
OUT_OF_TREE: dict[str, str] = dict(vllm_table.OUT_OF_TREE)

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


def _vllm_registered(arch: str) -> str | None:
    """The runner of an architecture vLLM registers ("generate" | "pooling" | "draft"), or None."""
    if arch in vllm_table.GENERATE or arch in vllm_table.TRANSFORMERS_SUPPORTED or arch in BACKEND_NAMES:
        return "generate"
    if arch in vllm_table.POOLING or arch in vllm_table.TRANSFORMERS_BACKEND:
        return "pooling"
    if arch in vllm_table.DRAFT:
        return "draft"
    return None


def runner_of(architectures: list[str]) -> tuple[str, str]:
    """(runner, convert) vLLM's `--runner auto` picks: for each architecture in order, a registered one decides
    by its class (`ChatGLMModel` generates, `BertModel` pools), else a known name suffix decides."""
    if architectures[0] in NATIVE:
        return "generate", "none"
    for arch in architectures:
        registered = _vllm_registered(arch)
        if registered is not None:
            return registered, "none"
        found = suffix_defaults(arch)
        if found is not None:
            return found
    return "generate", "none"


@dataclass(frozen=True)
class VllmSupport:
    runs: bool
    how: str  # "vllm:<module.Class>" | "transformers" | why vLLM cannot run it

    @property
    def vllm(self) -> str:
        return "yes" if self.runs else "no"


def vllm_support(
    architectures: list[str], model_impl: str = "auto", transformers_has: Callable[[str], bool] = lambda a: False
) -> VllmSupport:
    """Whether vLLM (the version in vllm_table.py) runs `architectures` for text generation, and how: its own
    class for a registered name (or the name with its suffix replaced, as vLLM normalizes it), else its
    Transformers backend when transformers can build the class (`transformers_has`)."""
    if not architectures:
        return VllmSupport(False, "no architectures in config.json")
    runner, convert = runner_of(architectures)
    if runner != "generate":
        return VllmSupport(False, f"{architectures[0]} is a {runner} model in vLLM (convert {convert})")
    if model_impl != "transformers":
        for arch in architectures:
            if arch in vllm_table.TRANSFORMERS_SUPPORTED or arch in BACKEND_NAMES:
                if model_impl == "native":
                    continue
                return VllmSupport(True, "transformers")
            name = arch if arch in vllm_table.GENERATE else _vllm_normalize(arch)
            if name is not None:
                return VllmSupport(True, f"vllm:{vllm_table.GENERATE[name]}")
    if model_impl != "native":
        for arch in architectures:
            if arch in BACKEND_NAMES or transformers_has(arch):
                return VllmSupport(True, "transformers")
    for arch in architectures:
        if arch in PREVIOUSLY_SUPPORTED:
            return VllmSupport(False, f"{arch} was supported until vLLM v{PREVIOUSLY_SUPPORTED[arch]}")
        if arch in OUT_OF_TREE:
            return VllmSupport(False, f"{arch} needs the plugin {OUT_OF_TREE[arch]}")
    return VllmSupport(False, f"vLLM {vllm_table.VLLM_VERSION} has no class for {', '.join(architectures)}")


def _vllm_normalize(arch: str) -> str | None:
    """vLLM `_normalize_arch`: FooForX -> the first registered FooFor<suffix> (a generating class), or None."""
    for suffix, _, _ in SUFFIX_DEFAULTS:
        if arch.endswith(suffix):
            for repl, _, _ in SUFFIX_DEFAULTS:
                candidate = arch[: -len(suffix)] + repl
                if candidate in vllm_table.GENERATE:
                    return candidate
            return None
    return None


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
