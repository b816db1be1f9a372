"""`--max-model-len` parsing and the max_model_len derivation as vLLM does it (docs/vllm-rules.md §2.7, L-01..L-23).

Pure functions over a config object read with `getattr` (a transformers config, or any namespace), so they
can be tested without transformers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from prestage.stages.errors import InvalidModelError, UsageError

# Step A keys, in vLLM's order: the minimum of the present ones wins.
LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# rope types whose factor does not multiply the length (they already describe the extended context).
_UNSCALED_ROPE = {"su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling"}
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_HUMAN = re.compile(r"^(\d+(?:\.\d+)?)([kKmMgGtT])$")
DEFAULT_WHEN_UNKNOWN = 2048


def parse_max_model_len(value) -> int | None:
    """The CLI value as vLLM reads it: None, -1 (auto), or an int >= 1 (L-23).

    `1k` = 1000 and `25.6k` = 25600 (decimal suffixes k/m/g/t); `1K` = 1024 (binary suffixes K/M/G/T, whole
    numbers only); `auto` and `-1` mean "derive it" (-1 is kept so launch can auto-fit to memory).
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise UsageError(f"--max-model-len {value!r}: expected a number such as 4096, 4k, 4K, or auto")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip()
        if text.lower() == "auto":
            return -1
        m = _HUMAN.match(text)
        if m:
            digits, suffix = m.groups()
            if suffix in _BINARY:
                if "." in digits:
                    raise UsageError(
                        f"--max-model-len {text}: a binary suffix ({suffix}) takes a whole number; "
                        f"write e.g. {int(float(digits))}{suffix}, or use the decimal "
                        f"{suffix.lower()}"
                    )
                number = int(digits) * _BINARY[suffix]
            else:
                scaled = float(digits) * _DECIMAL[suffix]
                if scaled != int(scaled):
                    raise UsageError(f"--max-model-len {text}: not a whole number of tokens")
                number = int(scaled)
        else:
            try:
                number = int(text)
            except ValueError:
                raise UsageError(
                    f"--max-model-len {text!r}: expected a number such as 4096, 4k (=4000), 4K (=4096), or auto"
                ) from None
    if number == -1:
        return -1
    if number < 1:
        raise UsageError(f"--max-model-len {number}: must be >= 1, or -1 / auto to derive it from the config")
    return number


def rope_dicts(cfg) -> list[dict]:
    """The rope parameter dicts of a config: the flat one, or each per-layer-type one (nested)."""
    rp = getattr(cfg, "rope_parameters", None)
    if not isinstance(rp, dict) or not rp:
        return []
    if all(isinstance(v, dict) or v is None for v in rp.values()) and any(isinstance(v, dict) for v in rp.values()):
        return [v for v in rp.values() if isinstance(v, dict)]
    return [rp]


@dataclass
class MaxLen:
    max_model_len: int
    key: str | None  # what bounds the model: a config key, "sliding_window" or "default" (None: L-17)
    derived: float | int | None  # the model's own maximum (after sliding-window cap and rope scaling)
    warnings: list = field(default_factory=list)


def _number(cfg, name: str):
    v = getattr(cfg, name, None)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise InvalidModelError(f"config.json {name}={v!r} is not a number; fix config.json")
    return v


def derive_from_keys(cfg) -> tuple[float, str | None]:
    """Step A: the minimum of the length keys present; `model_max_length` overrides even when larger."""
    derived, key = math.inf, None
    for name in LENGTH_KEYS:
        v = _number(cfg, name)
        if v is not None and v < derived:
            derived, key = v, name
    mml = _number(cfg, "model_max_length")
    if mml:
        derived, key = mml, "model_max_length"
    return derived, key


def resolve_max_model_len(
    cfg, user: int | None, *, disable_sliding_window: bool = False, allow_long: bool = False
) -> MaxLen:
    """vLLM `_get_and_verify_max_len` for the generate runner (§2.7 step B)."""
    warnings: list[str] = []
    derived, key = derive_from_keys(cfg)
    sliding = _number(cfg, "sliding_window")
    if disable_sliding_window and sliding is not None and sliding < derived:
        derived, key = sliding, "sliding_window"
    if derived == math.inf:
        if user is not None and user != -1:
            # vLLM returns the user's value here with no other check (L-17).
            return MaxLen(int(user), None, None, warnings)
        warnings.append(
            f"the config has none of the keys {', '.join(LENGTH_KEYS)}: assuming the model's maximum "
            f"length is {DEFAULT_WHEN_UNKNOWN}; pass --max-model-len to set it"
        )
        derived, key = DEFAULT_WHEN_UNKNOWN, "default"
    dicts = rope_dicts(cfg)
    if dicts and "gemma3" not in str(getattr(cfg, "model_type", "")):
        factor: float | None = 1.0
        for rp in dicts:
            if rp.get("rope_type") not in _UNSCALED_ROPE:
                factor = rp.get("factor", factor)
        if factor is None:
            warnings.append("rope_parameters has a null scaling factor; using 1.0")
            factor = 1.0
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise InvalidModelError(f"config.json rope factor {factor!r} is not a number; fix config.json")
        if not factor > 0:  # a zero, negative or NaN factor would give a length launch cannot hold
            raise InvalidModelError(
                f"config.json rope factor {factor!r} must be a positive number; fix config.json or --hf-overrides"
            )
        derived = derived * factor
    if not derived >= 1:  # NaN, zero or negative: no sequence fits (launch would divide by it)
        raise InvalidModelError(
            f"config.json {key}={_num(derived)}: the model's maximum length must be at least 1; fix config.json "
            "or --hf-overrides"
        )
    longrope = any(rp.get("rope_type") == "longrope" for rp in dicts)
    if user is None or user == -1:
        if longrope:  # LongRoPE defaults to the short pre-training context (L-05)
            value = int(getattr(cfg, "original_max_position_embeddings", None) or derived)
            bound = (
                "original_max_position_embeddings" if getattr(cfg, "original_max_position_embeddings", None) else key
            )
            return MaxLen(value, bound, _num(derived), warnings)
        return MaxLen(int(derived), key, _num(derived), warnings)
    if user > derived:
        mml = getattr(cfg, "model_max_length", None)
        if not (mml is not None and user <= mml):
            if not allow_long:  # the flag's value is at fault, not the model: a usage error
                raise UsageError(
                    f"--max-model-len {user} is greater than the model's derived maximum ({key}={_num(derived)} "
                    f"or model_max_length={mml} in config.json); pass --max-model-len <= {int(derived)}, or set "
                    "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 to override (outputs may be wrong past the trained length)"
                )
            warnings.append(
                f"--max-model-len {user} is greater than the model's derived maximum ({key}="
                f"{_num(derived)}); kept because VLLM_ALLOW_LONG_MAX_MODEL_LEN is set"
            )
    return MaxLen(int(user), key, _num(derived), warnings)


def _num(x):
    """An int when the value is whole (so manifests stay stable), else the float."""
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x
