"""dtype resolution as vLLM does it (docs/vllm-rules.md, §2.8, cases D-01..D-08), over dtype names, without torch.

- `normalize_requested(s)`: the `--dtype` value as a canonical name (`half` -> `float16`, `float` -> `float32`).
- `config_dtype(cfg, folder)`: the checkpoint's dtype: config `dtype`/`torch_dtype` (also of its text, vision and
  encoder sub-configs), else the safetensors headers in the model folder, else `float32`.
- `resolve_dtype(...)`: the dtype for one target. `capability` is the CUDA compute capability (e.g. (8, 0)),
  or None for CPU; so V100/T4 cases can be decided and tested on any machine.
"""

from __future__ import annotations

from pathlib import Path

from prestage.stages import safetensors
from prestage.stages.errors import InvalidModelError, UsageError

REQUESTED = {
    "auto": "auto",
    "half": "float16",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "float": "float32",
    "float32": "float32",
}
# fp16 is numerically unstable for these model types (vLLM `_MODEL_TYPE_TO_INVALID_DTYPES`-style table).
NO_FLOAT16 = {"gemma2", "gemma3", "gemma3_text", "glm4"}
# which float dtypes hold every value of which (lossless casts), for the broadcast rule
_LOSSLESS = {
    ("float16", "float32"),
    ("bfloat16", "float32"),
    ("float16", "float64"),
    ("bfloat16", "float64"),
    ("float32", "float64"),
    ("float8_e4m3fn", "float16"),
    ("float8_e4m3fn", "bfloat16"),
    ("float8_e4m3fn", "float32"),
    ("float8_e5m2", "float16"),
    ("float8_e5m2", "bfloat16"),
    ("float8_e5m2", "float32"),
}
_ORDER = ("float32", "bfloat16", "float16", "float64", "float8_e4m3fn", "float8_e5m2")


def normalize_requested(value: str | None) -> str:
    v = (value or "auto").strip().lower()
    if v.startswith("torch."):
        v = v[len("torch.") :]
    if v not in REQUESTED:
        raise UsageError(f"--dtype {value!r}: unknown dtype; use one of {', '.join(REQUESTED)}")
    return REQUESTED[v]


def _name(d) -> str | None:
    if d is None:
        return None
    s = str(d)
    return s[len("torch.") :] if s.startswith("torch.") else s


def config_dtype(cfg, folder: Path | None) -> tuple[str, str]:
    """(dtype name, where it came from): the config fields first, then safetensors headers, else float32."""
    for owner, label in (
        (cfg, "config"),
        (_get_text(cfg), "text_config"),
        (getattr(cfg, "vision_config", None), "vision_config"),
        (getattr(cfg, "encoder_config", None), "encoder_config"),
    ):
        d = _name(getattr(owner, "dtype", None)) if owner is not None else None
        if d:
            return d, label
    if folder is not None:
        found = safetensors_dtypes(folder)
        if found:
            return common_broadcastable(found), "safetensors headers"
    return "float32", "default (no dtype in config or weights)"


def _get_text(cfg):
    get = getattr(cfg, "get_text_config", None)
    try:
        return get() if callable(get) else None
    except Exception:
        return None


def safetensors_dtypes(folder: Path) -> set[str]:
    """Float dtypes (torch names) in the headers of every *.safetensors directly in `folder` (no tensor is read);
    a malformed header is an InvalidModelError naming the file."""
    out: set[str] = set()
    for path in sorted(Path(folder).glob("*.safetensors")):
        for entry in safetensors.read_header(path).tensors.values():
            d = safetensors.DTYPES[entry["dtype"]]
            if d.checkpoint_float:
                out.add(d.torch)
    return out


def common_broadcastable(dtypes: set[str]) -> str:
    """The dtype into which most of the others cast losslessly (vLLM `common_broadcastable_dtype`)."""
    ordered = sorted(dtypes, key=lambda d: _ORDER.index(d) if d in _ORDER else len(_ORDER))
    return max(ordered, key=lambda t: sum(s == t or (s, t) in _LOSSLESS for s in ordered))


def supported_dtypes(capability: tuple[int, int] | None) -> list[str]:
    """What a target runs, in preference order: CUDA sm>=80 bf16/fp16/fp32, sm60-7x fp16/fp32, CPU all three."""
    if capability is None:
        return ["bfloat16", "float16", "float32"]
    if capability >= (8, 0):
        return ["bfloat16", "float16", "float32"]
    if capability >= (6, 0):
        return ["float16", "float32"]
    return ["float32"]


def cpu_dtype(requested: str) -> tuple[str, str]:
    """prestage's CPU fallback: float32 unless --dtype asked otherwise (bf16/fp16 matmuls are slow on most CPUs,
    and float32 is the numerically safe reference)."""
    if requested == "auto":
        return "float32", "CPU runs float32 for speed and numerical safety"
    return requested, f"CPU runs {requested} as --dtype asked"


def resolve_dtype(
    model_type: str, cfg_dtype: str, requested: str, capability: tuple[int, int] | None, pooling: bool = False
) -> tuple[str, str | None]:
    """(dtype, note) as vLLM's `_get_and_verify_dtype` decides for a device of `capability`.

    Raises InvalidModelError when float16 is chosen for a model type that does not support it (case D-05).
    """
    note = None
    if requested == "auto":
        supported = [d for d in supported_dtypes(capability) if not (d == "float16" and model_type in NO_FLOAT16)]
        preferred = "float16" if pooling and "float16" in supported else supported[0]
        if cfg_dtype == "float32":
            chosen = preferred
            if chosen != "float32":
                note = f"downcasting the float32 checkpoint to {chosen}"
        elif cfg_dtype in supported:
            chosen = cfg_dtype
        else:
            chosen = preferred
            dev = "CPU" if capability is None else f"compute capability {capability[0]}.{capability[1]}"
            note = f"the device ({dev}) does not support {cfg_dtype}; falling back to {chosen} for compatibility"
    else:
        chosen = requested
        if chosen not in supported_dtypes(capability):
            raise UsageError(
                f"--dtype {chosen}: a GPU of compute capability {capability[0]}.{capability[1]} "
                f"does not support it; use one of {', '.join(supported_dtypes(capability))}"
            )
        if chosen != cfg_dtype:
            note = f"casting the {cfg_dtype} checkpoint to {chosen} as --dtype asked"
    if chosen == "float16" and model_type in NO_FLOAT16:
        raise InvalidModelError(
            f"--dtype float16: model type '{model_type}' does not support float16 "
            "(numerical instability); use --dtype bfloat16 or float32"
        )
    return chosen, note
