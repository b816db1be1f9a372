"""Where launch's sampling values come from, as vLLM's `--generation-config auto`: the flag, else the model's
generation_config.json (tokenize-prep records its sampling defaults), else prestage's default."""

from __future__ import annotations

from prestage.stages.errors import UsageError
from prestage.stages.manifest import Manifest
from prestage.stages.records import record_of


def given(params: dict, key: str, default):
    """params[key] unless it is absent or None (a 0 the user passed stays 0, so it can be refused)."""
    value = params.get(key)
    return default if value is None else value


def check_sampling(
    max_tokens=None, temperature=None, top_p=None, top_k=None, min_p=None, repetition_penalty=None, stop=()
) -> None:
    """Refuse an out-of-range sampling value (UsageError naming the flag, the value and the range); None is
    "not given". Shared by SamplingParams and launch's flag check, and free of torch."""
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens {max_tokens}: must be at least 1")
    if temperature is not None and temperature < 0:
        raise UsageError(f"--temperature {temperature}: must be >= 0 (0 means greedy)")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"--top-p {top_p}: must be in (0, 1]")
    if top_k is not None and top_k < -1:
        raise UsageError(f"--top-k {top_k}: must be -1 or 0 (off) or a positive count")
    if min_p is not None and not 0 <= min_p <= 1:
        raise UsageError(f"--min-p {min_p}: must be in [0, 1]")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise UsageError(f"--repetition-penalty {repetition_penalty}: must be > 0 (1 is off)")
    if any(not s for s in stop or ()):
        raise UsageError("--stop '': an empty stop string would stop at once; drop it")


def generation_config_mode(params: dict) -> str:
    """--generation-config, checked: auto (use generation_config.json's sampling defaults) or vllm (ignore it)."""
    mode = str(params.get("generation_config") or "auto").lower()
    if mode not in ("auto", "vllm"):
        raise UsageError(
            f"--generation-config {mode!r}: use auto (the model's generation_config.json defaults) "
            "or vllm (ignore the file)"
        )
    return mode


def generation_defaults(mode: str, upstream: dict[str, Manifest]) -> dict:
    """The sampling defaults tokenize-prep recorded from generation_config.json, or {} under `vllm`."""
    if mode != "auto" or "tokenize-prep" not in upstream:
        return {}
    return record_of(upstream["tokenize-prep"]).generation_defaults.given()
