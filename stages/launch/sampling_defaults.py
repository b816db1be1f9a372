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
