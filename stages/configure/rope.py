"""vLLM's RoPE "historical patches" (docs/vllm-rules.md, §2.5, rules R1-R11), applied to a built config and recorded.

Every change is appended to `patches` as `{rule, field, before, after, why}`, so the manifest says exactly how
the config differs from config.json. Rules R4-R9 touch plain dicts (tested without transformers); R10/R11
call the config's own transformers methods (`standardize_rope_params`, `validate_rope`) when it has them.
"""

from __future__ import annotations

import copy
import math

from prestage.stages.errors import InvalidModelError

# R3: a rope dict is nested (one dict per layer type) when its keys are all layer-type names.
_EXTRA_NESTED_KEYS = {"main", "compress"}
_FALLBACK_LAYER_TYPES = {
    "full_attention",
    "sliding_attention",
    "chunked_attention",
    "window_attention",
    "indexed_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
    "minimax_m3_sparse",
    "conv",
    "moe",
    "hybrid",
    "hybrid_sliding",
    "reference_sliding_attention",
    "linear_attention",
    "sparse",
    "dense",
}
# R4: (type, rope_type) pairs that are allowed to differ (the second pass over the same dict must not fail).
_ALLOWED_PAIRS = {("su", "longrope"), ("mrope", "default")}


def _layer_types() -> set[str]:
    try:
        from transformers.configuration_utils import ALLOWED_LAYER_TYPES

        return set(ALLOWED_LAYER_TYPES)
    except ImportError:
        return _FALLBACK_LAYER_TYPES


def is_nested(rp: dict, layer_types: set[str] | None = None) -> bool:
    allowed = (layer_types if layer_types is not None else _layer_types()) | _EXTRA_NESTED_KEYS
    return bool(rp) and set(rp) <= allowed


def _record(patches: list, rule: str, field: str, before, after, why: str) -> None:
    patches.append(
        {"rule": rule, "field": field, "before": copy.deepcopy(before), "after": copy.deepcopy(after), "why": why}
    )


def legacy_rules(rp: dict, field: str, patches: list, warnings: list) -> None:
    """R4-R9 on one flat rope dict, in place."""
    rope_type, legacy = rp.get("rope_type"), rp.get("type")
    if rope_type is not None and legacy is not None:
        if rope_type != legacy and (legacy, rope_type) not in _ALLOWED_PAIRS:  # R4
            raise InvalidModelError(
                f"config.json {field}: conflicting 'rope_type={rope_type}' (modern field) and 'type={legacy}' "
                "(legacy field); keep only one of them"
            )
    elif legacy is not None:  # R5: the legacy key is kept beside the new one
        rp["rope_type"] = legacy
        _record(
            patches, "R5 legacy type", f"{field}.rope_type", None, legacy, "legacy 'type' key copied to 'rope_type'"
        )
    rope_type = rp.get("rope_type")
    if rope_type is None:  # R6
        return
    if rope_type == "su":  # R7
        rp["rope_type"] = "longrope"
        _record(
            patches, "R7 su->longrope", f"{field}.rope_type", "su", "longrope", "legacy rope_type 'su' is 'longrope'"
        )
        warnings.append(f"{field}: replacing legacy rope_type 'su' with 'longrope'")
    elif rope_type == "mrope":  # R8
        if "mrope_section" not in rp:
            raise InvalidModelError(
                f"config.json {field}: legacy rope_type 'mrope' requires 'mrope_section'; "
                "add mrope_section (e.g. [16, 24, 24]) to the rope parameters"
            )
        rp["rope_type"] = "default"
        _record(
            patches,
            "R8 mrope->default",
            f"{field}.rope_type",
            "mrope",
            "default",
            "legacy rope_type 'mrope' is default rope with an mrope_section",
        )
        warnings.append(f"{field}: replacing legacy rope_type 'mrope' with 'default'")
    elif rope_type == "telechat3-yarn":  # R9
        if "factor" not in rp:
            raise InvalidModelError(f"config.json {field}: rope_type 'telechat3-yarn' needs a 'factor'; add it")
        before = dict(rp)
        rp["rope_type"] = "yarn"
        rp["attention_factor"] = 0.07 * math.log(rp["factor"]) + 1.0
        rp.pop("type", None)
        _record(
            patches,
            "R9 telechat3-yarn",
            field,
            before,
            dict(rp),
            "telechat3-yarn is yarn with attention_factor = 0.07*ln(factor)+1",
        )


def patch_rope(cfg, field: str, patches: list, warnings: list) -> None:
    """vLLM `patch_rope_parameters` on one config object (its own fields only), recording each change."""
    prefix = f"{field}." if field else ""
    # R1: theta alias
    theta = getattr(cfg, "rope_theta", None)
    if theta is None and getattr(cfg, "rotary_emb_base", None) is not None:
        theta = cfg.rotary_emb_base
        cfg.rope_theta = theta
        _record(
            patches,
            "R1 theta alias",
            f"{prefix}rope_theta",
            None,
            theta,
            "'rotary_emb_base' is the deprecated name of rope_theta",
        )
        warnings.append(f"{prefix}rotary_emb_base is deprecated; read as rope_theta={theta}")
    # R2: partial rotary alias
    if getattr(cfg, "partial_rotary_factor", None) is None:
        for alias in ("rotary_pct", "rotary_emb_fraction"):
            if getattr(cfg, alias, None) is not None:
                cfg.partial_rotary_factor = getattr(cfg, alias)
                _record(
                    patches,
                    "R2 partial-rotary alias",
                    f"{prefix}partial_rotary_factor",
                    None,
                    cfg.partial_rotary_factor,
                    f"'{alias}' is another name of partial_rotary_factor",
                )
                break
    rp = getattr(cfg, "rope_parameters", None)
    if theta is None and not rp:
        return
    if isinstance(rp, dict) and rp:
        if is_nested(rp):
            for key, sub in rp.items():
                if isinstance(sub, dict):
                    legacy_rules(sub, f"{prefix}rope_parameters.{key}", patches, warnings)
        else:
            legacy_rules(rp, f"{prefix}rope_parameters", patches, warnings)
    # R10: transformers' standardisation (setdefault of rope_type/rope_theta, original_max_position_embeddings)
    if callable(getattr(cfg, "standardize_rope_params", None)):
        before = copy.deepcopy(getattr(cfg, "rope_parameters", None))
        cfg.standardize_rope_params()
        after = getattr(cfg, "rope_parameters", None)
        if after != before:
            _record(
                patches,
                "R10 standardize",
                f"{prefix}rope_parameters",
                before,
                after,
                "transformers standardize_rope_params fills rope_type, rope_theta and the pre-training length",
            )
        if (
            theta is not None
            and isinstance(after, dict)
            and not is_nested(after)
            and after.get("rope_theta") not in (None, theta)
        ):
            # vLLM keeps the dict's theta (setdefault only), so an aliased theta is silently ignored (case L-13).
            warnings.append(
                f"{prefix}rope_theta={theta} from config.json is not used: rope_parameters already "
                f"holds rope_theta={after.get('rope_theta')} (as vLLM does)"
            )
    # R11: transformers' validation
    if callable(getattr(cfg, "validate_rope", None)):
        try:
            cfg.validate_rope()
        except (KeyError, ValueError, TypeError) as e:
            msg = e.args[0] if e.args else str(e)
            raise InvalidModelError(f"config.json {prefix}rope_parameters: {msg}") from None


def patch_all(config, patches: list, warnings: list) -> None:
    """R1-R11 on the config, its text config and every sub-config, as vLLM's `get_config` does."""
    seen: set[int] = set()
    targets = [("", config)]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            text = get_text()
        except Exception:
            text = config
        if text is not config:
            name = next(
                (
                    k
                    for k in ("text_config", "decoder", "generator", "text_encoder")
                    if getattr(config, k, None) is text
                ),
                "text_config",
            )
            targets.append((name, text))
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None:
            targets.append((name, sub))
    for field, cfg in targets:
        if id(cfg) in seen:
            continue
        seen.add(id(cfg))
        patch_rope(cfg, field, patches, warnings)
