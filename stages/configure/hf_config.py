"""Reading config.json / params.json and building the config object as vLLM does (docs/vllm-rules.md §2.1-2.4).

- `read_json(folder, name)`: the raw dict, or a one-line InvalidModelError.
- `build(folder, raw, ...)`: the transformers config object, built as vLLM builds it: prestage's own classes
  (configs.py) first, then transformers' AutoConfig on the local folder, with remote code only when trusted.
  Returns a `Loaded` with the object, the patches made while building, warnings and the remote-code record.

Differences from vLLM, on purpose (keeping the outcome):
- Untrusted remote code: vLLM means to rewrap transformers' refusal into a "--trust-remote-code" hint, but
  the rewrap looks for a message transformers 5 no longer emits, so users get the raw ValueError (§9.2). We
  check before calling transformers and raise UntrustedCodeError naming `auto_map.AutoConfig`.
- A config that fails to parse is an error at once: vLLM retries after a 2 s sleep, which cannot help a
  local file that is malformed (§9.2).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from prestage.stages import model_json, names
from prestage.stages.configure import configs
from prestage.stages.digest import sha256_hex
from prestage.stages.errors import (
    InvalidModelError,
    NotFoundError,
    PrestageError,
    UnsupportedError,
    UntrustedCodeError,
    UsageError,
)
from prestage.stages.launch import vllm_table


def read_json(folder: Path, name: str) -> dict:
    path = Path(folder) / name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFoundError(f"{path}: missing (it was there at resolve); re-run resolve") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidModelError(f"{path}: cannot be read as UTF-8 text ({type(e).__name__}); re-download it") from None
    data = model_json.loads(text, f"{name} ({path})")  # bounded: depth and 64-bit integers
    if not isinstance(data, dict):
        raise InvalidModelError(f"{name} holds a JSON {type(data).__name__}, not an object; fix or re-download {path}")
    return data


# Size fields that must be positive integers when present (checked before transformers divides by them).
_COUNT_KEYS = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "num_key_value_heads",
    "vocab_size",
    "intermediate_size",
    "head_dim",
    "n_embd",
    "n_head",
    "n_layer",
    "n_positions",
    "max_position_embeddings",
)


def check_counts(raw: dict, name: str) -> None:
    for where, d in (("", raw), ("text_config.", raw.get("text_config"))):
        if not isinstance(d, dict):
            continue
        for key in _COUNT_KEYS:
            v = d.get(key)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidModelError(f"{name} {where}{key}={v!r}: must be a positive integer; fix the config")


@dataclass
class Loaded:
    config: object  # a transformers PreTrainedConfig
    patches: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    remote_code: dict | None = None
    config_class: str = ""


def _quiet_transformers():
    """transformers logs rope/validation notes on stderr; configure reports what matters itself."""
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _auto_config_ref(raw: dict) -> str | None:
    am = raw.get("auto_map")
    if isinstance(am, dict) and isinstance(am.get("AutoConfig"), str):
        return am["AutoConfig"]
    if isinstance(am, list):  # very old repos: a list of class references
        return next((r for r in am if isinstance(r, str) and r.endswith("Config")), None)
    return None


def _module_file(ref: str) -> tuple[str | None, str]:
    """'org/repo--configuration_x.XConfig' -> ('org/repo', 'configuration_x.py')."""
    upstream, _, local = ref.rpartition("--")
    module = local.rsplit(".", 1)[0]
    return (upstream or None), module.replace(".", "/") + ".py"


def _fetch_remote_files(folder: Path, ref: str, hub_source: dict | None, params: dict) -> list[str]:
    """Make the remote module (and what it imports relatively) present in `folder`; returns their names.

    A hub model's snapshot holds only what earlier stages fetched, so the code files are downloaded at the
    commit resolve pinned. A local folder must already hold them.
    """
    upstream, first = _module_file(ref)
    if upstream:
        raise UnsupportedError(
            f"auto_map.AutoConfig={ref} runs code from another repo ({upstream}) that cannot be "
            "pinned to the commit resolve recorded; prestage does not run it"
        )
    from transformers.dynamic_module_utils import get_relative_imports

    wanted, done = [first], []
    while wanted:
        name = wanted.pop()
        if name in done:
            continue
        names.repo_path(name, f"auto_map.AutoConfig={ref}", InvalidModelError)
        path = folder / name
        if hub_source and hub_source.get("repo_id"):
            # a cached code file is checked against the listing before it can be imported
            entry = (hub_source.get("files") or {}).get(name)
            path = _verified(hub_source, name, entry, params) or _download(hub_source, name, params, entry)
        elif not path.is_file():
            raise InvalidModelError(
                f"auto_map.AutoConfig={ref} needs {name}, which is not in {folder}; copy "
                "the repo's code files into the model folder"
            )
        done.append(name)
        for rel in get_relative_imports(str(path)):
            wanted.append(rel.replace(".", "/") + ".py")
    return sorted(done)


def _verified(hub_source: dict, name: str, entry: dict | None, params: dict) -> Path | None:
    from prestage.stages import hub

    s = hub.settings(params)
    return hub.verify_cached(s.cache_dir, hub_source["repo_id"], hub_source["commit"], name, entry)


def _download(hub_source: dict, name: str, params: dict, entry: dict | None = None) -> Path:
    from prestage.stages import hub

    s = hub.settings(params)
    hub.prepare_env(s)
    if s.offline:
        raise InvalidModelError(
            f"{hub_source['repo_id']}: remote code file {name} is not in the cache and offline "
            "mode is on; run configure once online"
        )
    return hub.HubClient(s).download(hub_source["repo_id"], name, hub_source["commit"], expect=entry)


def _translate_build_error(e: Exception, name: str) -> Exception:
    msg = " ".join(str(e.args[0] if e.args else e).split())
    if "does not recognize this architecture" in msg or "Unrecognized model" in msg:
        return UnsupportedError(
            f"{name}: transformers does not know this model_type and there is no "
            "auto_map.AutoConfig; upgrade transformers or use a supported model"
        )
    if "contains custom code" in msg or "trust_remote_code" in msg:
        return UntrustedCodeError(f"{name}: the repo's own config code must run; pass --trust-remote-code")
    return InvalidModelError(f"{name}: transformers cannot build the config: {msg[:300]}")


def build(
    folder: Path,
    raw: dict,
    *,
    config_file: str = "config.json",
    trust_remote_code: bool = False,
    hf_overrides: dict | None = None,
    hub_source: dict | None = None,
    params: dict | None = None,
    extra_warnings: list | None = None,
) -> Loaded:
    """Build the config object from `raw` (the parsed config file) in `folder`."""
    folder = Path(folder)
    overrides = dict(hf_overrides or {})
    loaded = Loaded(config=None, warnings=list(extra_warnings or []))
    name = config_file
    model_type = overrides.get("model_type", raw.get("model_type"))
    ref = _auto_config_ref(raw)
    if not raw.get("model_type") and not raw.get("architectures") and ref is None:
        raise InvalidModelError(
            f"{name} has neither 'model_type' nor 'architectures'; it does not describe a model "
            '(add model_type, e.g. "llama")'
        )
    if not model_type and ref is None and raw.get("speculators_config") is None:  # no model_type (C-05)
        raise InvalidModelError(
            f"{name} has no 'model_type' (architectures {raw.get('architectures')}); add the "
            'model type (e.g. "llama"): transformers needs it to pick the config class'
        )
    if raw.get("speculators_config") is not None and not model_type:
        raise UnsupportedError(f"{name} is a speculators (draft model) config; prestage runs target models only")

    check_counts(raw, name)

    import transformers  # heavy: only here
    from transformers import AutoConfig, PreTrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    _quiet_transformers()
    own = configs.register(model_type) if model_type else None
    if own is not None and raw.get("model_type") and raw["model_type"] != model_type:
        configs.register(raw["model_type"])
    known = bool(model_type) and model_type in CONFIG_MAPPING
    remote = ref is not None and own is None and trust_remote_code  # trusted code wins, as in transformers
    if ref is not None and not known and not trust_remote_code:
        what = (
            f"model_type {model_type!r} is not known to transformers"
            if model_type
            else "it has no model_type (its config class is the repo's own)"
        )
        raise UntrustedCodeError(
            f"{name}: {what}, so the repo's own code auto_map.AutoConfig={ref} would have to run; pass "
            "--trust-remote-code to allow it"
        )
    if model_type and not known and model_type in vllm_table.CONFIG_TYPES:
        raise UnsupportedError(
            f"{name}: model_type {model_type!r} is built by vLLM's own config class, which prestage does not "
            "have; run it on vLLM directly"
        )
    if model_type and not known and ref is None and config_file != "params.json":  # unknown type (C-04)
        raise UnsupportedError(
            f"{name}: model_type {model_type!r} is not known to transformers "
            f"{transformers.__version__} and the repo has no auto_map.AutoConfig code; upgrade "
            "transformers or use a supported model"
        )
    if ref is not None and known and own is None and not trust_remote_code:
        loaded.warnings.append(
            f"{name} names remote code auto_map.AutoConfig={ref}, but model_type "
            f"{model_type!r} is built in: using transformers' own class (no code run)"
        )

    # vLLM applies its legacy RoPE rules after transformers built the object; transformers 5.24 already
    # rejects some legacy forms while building (Phi-3's "su" fails longrope validation before its own rename),
    # so the rules that change meaning (su, mrope, telechat3-yarn) run on the raw dict first: same outcome.
    built_from, prepassed = _rope_prepass(raw, loaded)
    try:
        with warnings.catch_warnings():  # transformers' deprecation notes are not the user's business here
            warnings.simplefilter("ignore")
            if config_file == "params.json":  # already mapped to HF names (mistral.py)
                config = PreTrainedConfig.from_dict(raw)
            elif remote:
                config = _construct_remote(folder, raw, ref, hub_source, params or {}, loaded)
            elif prepassed or ("model_type" in overrides and overrides["model_type"] != raw.get("model_type")):
                if model_type == "mistral" and "layer_types" in built_from:  # transformers' heuristic (C-07)
                    model_type = "ministral"
                config = CONFIG_MAPPING[model_type].from_dict(dict(built_from, model_type=model_type))
            else:
                config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except PrestageError:
        raise
    except Exception as e:  # transformers' own validation (strict dataclass errors, KeyError, ...)
        raise _translate_build_error(e, name) from None
    loaded.config = config
    cls = type(config)
    loaded.config_class = f"remote:{ref}" if remote else f"{cls.__module__}.{cls.__qualname__}"
    _construction_patches(raw, config, loaded.patches)
    _post_parse(config, overrides, loaded)
    return loaded


def _construct_remote(folder: Path, raw: dict, ref: str, hub_source: dict | None, params: dict, loaded: Loaded):
    """The repo's own config class (trusted), with its code files present locally and recorded."""
    from transformers import AutoConfig

    files = _fetch_remote_files(folder, ref, hub_source, params)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    auto_map = raw.get("auto_map")
    loaded.remote_code = {
        "auto_map": dict(sorted(auto_map.items())) if isinstance(auto_map, dict) else auto_map,
        "repo_id": (hub_source or {}).get("repo_id"),
        "commit": (hub_source or {}).get("commit"),
        "files": [{"path": f, "sha256": sha256_hex(folder / f)} for f in files],
    }
    return config


def _rope_prepass(raw: dict, loaded: Loaded) -> tuple[dict, bool]:
    """(the dict to build from, whether a meaning-changing legacy rule applied) — see the note in build()."""
    from prestage.stages.configure import rope

    key = "rope_parameters" if isinstance(raw.get("rope_parameters"), dict) else "rope_scaling"
    rp = raw.get(key)
    if not isinstance(rp, dict) or not rp:
        return raw, False
    work = copy.deepcopy(raw)
    before = len(loaded.patches)
    if rope.is_nested(work[key]):
        for sub_key, sub in work[key].items():
            if isinstance(sub, dict):
                rope.legacy_rules(sub, f"{key}.{sub_key}", loaded.patches, loaded.warnings)
    else:
        rope.legacy_rules(work[key], key, loaded.patches, loaded.warnings)
    changed = any(p["rule"].split()[0] in ("R7", "R8", "R9") for p in loaded.patches[before:])
    return (work, True) if changed else (raw, False)


def _rope_view(d: dict) -> dict:
    return {k: copy.deepcopy(d[k]) for k in ("rope_scaling", "rope_parameters", "rope_theta") if k in d}


def _construction_patches(raw: dict, config, patches: list) -> None:
    """Record what transformers changed while building the object (what config.json says vs what we use)."""

    def rec(rule, fld, before, after, why):
        patches.append({"rule": rule, "field": fld, "before": before, "after": after, "why": why})

    if raw.get("model_type") and config.model_type != raw.get("model_type"):
        why = (
            "transformers reads a mistral config with layer_types as ministral"
            if raw.get("model_type") == "mistral"
            else "the config class names its own model_type"
        )
        rec("model_type", "model_type", raw.get("model_type"), config.model_type, why)
    if "torch_dtype" in raw and "dtype" not in raw:
        rec(
            "torch_dtype->dtype",
            "dtype",
            raw["torch_dtype"],
            _dtype_name(getattr(config, "dtype", None)),
            "transformers v5 renamed torch_dtype to dtype",
        )
    before = _rope_view(raw)
    after = copy.deepcopy(getattr(config, "rope_parameters", None))
    if (before or after) and before.get("rope_parameters", before.get("rope_scaling")) != after:
        rec(
            "rope_scaling->rope_parameters",
            "rope_parameters",
            before or None,
            after,
            "transformers v5 keeps rope_scaling and rope_theta in rope_parameters (setdefault of rope_type, "
            "rope_theta)",
        )
    text = config.get_text_config()
    raw_text = raw.get("text_config") if text is not config and isinstance(raw.get("text_config"), dict) else raw
    if "sliding_window" in raw_text and getattr(text, "sliding_window", None) != raw_text["sliding_window"]:
        rec(
            "sliding_window",
            "sliding_window",
            raw_text["sliding_window"],
            getattr(text, "sliding_window", None),
            "the config class drops the window when use_sliding_window is false",
        )


def _dtype_name(d):
    if d is None:
        return None
    s = str(d)
    return s[len("torch.") :] if s.startswith("torch.") else s


def _post_parse(config, overrides: dict, loaded: Loaded) -> None:
    """vLLM's steps after parsing: llm_config remap, architectures fallback, hf_overrides (§2.1.6, §2.4)."""
    patches = loaded.patches
    if getattr(config, "llm_config", None) is not None and getattr(config, "text_config", None) is None:
        config.text_config = config.llm_config  # llm_config as text_config (C-11)
        patches.append(
            {
                "rule": "llm_config->text_config",
                "field": "text_config",
                "before": None,
                "after": "llm_config",
                "why": "vLLM reads a model's llm_config as its text_config",
            }
        )
    if not getattr(config, "architectures", None) and "architectures" not in overrides:
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

        base = MODEL_MAPPING_NAMES.get(config.model_type)
        if isinstance(base, (list, tuple)):
            base = base[0] if base else None
        if base:
            config.architectures = [base]
            patches.append(
                {
                    "rule": "architectures fallback",
                    "field": "architectures",
                    "before": None,
                    "after": [base],
                    "why": "no architectures in config.json: the model type's base "
                    "class (transformers MODEL_MAPPING_NAMES), as vLLM does",
                }
            )
        else:
            raise InvalidModelError(
                f"config.json has no 'architectures' and model_type {config.model_type!r} has no default model "
                'class; add architectures, or pass --hf-overrides \'{"architectures": ["...ForCausalLM"]}\''
            )
    for key in sorted(overrides):
        if key == "model_type":
            continue
        try:
            _apply_override(config, key, overrides[key], patches)
        except PrestageError:
            raise
        except Exception as e:  # transformers' strict config fields reject a value of the wrong type
            msg = " ".join(str(e).split())[:200]
            raise UsageError(
                f"--hf-overrides {key}={json.dumps(overrides[key])[:80]}: the config rejects it "
                f"({type(e).__name__}: {msg}); pass a value of the field's type"
            ) from None


def _apply_override(config, key: str, value, patches: list) -> None:
    """One --hf-overrides entry set on the config (a dict merges into a dict-like field), recorded as patches."""
    if isinstance(value, dict) and hasattr(getattr(config, key, None), "update"):
        sub = getattr(config, key)
        for k in sorted(value):
            before = copy.deepcopy(sub.get(k) if isinstance(sub, dict) else getattr(sub, k, None))
            if isinstance(sub, dict):
                sub[k] = value[k]
            else:
                setattr(sub, k, value[k])
            patches.append(
                {
                    "rule": "hf_overrides",
                    "field": f"{key}.{k}",
                    "before": _plainish(before),
                    "after": value[k],
                    "why": "--hf-overrides",
                }
            )
    else:
        before = copy.deepcopy(getattr(config, key, None))
        config.update({key: value})
        patches.append(
            {"rule": "hf_overrides", "field": key, "before": _plainish(before), "after": value, "why": "--hf-overrides"}
        )


def _plainish(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plainish(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plainish(x) for k, x in v.items()}
    to_dict = getattr(v, "to_dict", None)
    return _plainish(to_dict()) if callable(to_dict) else str(v)


def transformers_can_build(
    arch: str, config, trust_remote_code: bool, fetch=None, *, any_class_checked: bool = False
) -> bool:
    """Whether the Transformers backend can build `arch`, as vLLM decides: transformers' class of that name, else
    (with --trust-remote-code) the repo's own class named by an `auto_map` AutoModel* entry; and that class must
    be backend-compatible (it supports attention backends, or its module calls the attention interface).

    `fetch(ref)` makes the repo's modeling code present in the model folder and returns the folder (None: it
    cannot). The compatibility check applies to the repo's own classes always (prestage's backend runs them
    through the same attention interface) and to transformers' classes with `any_class_checked` (vLLM's rule;
    prestage's own backend runs transformers' classes as they are).
    """
    import transformers

    cls = None
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", arch or ""):
        try:
            cls = getattr(transformers, arch, None)
        except Exception:  # a missing optional dependency of that model's module, ...: transformers can't build it
            cls = None
    remote = False
    if cls is None:
        auto_map = getattr(config, "auto_map", None) or {}
        refs = [v for k, v in auto_map.items() if k.startswith("AutoModel") and isinstance(v, str)]
        if not (trust_remote_code and isinstance(auto_map, dict) and refs):
            return False
        cls, remote = _remote_model_class(refs, fetch), True
    if not isinstance(cls, type) or not (hasattr(cls, "from_config") or hasattr(cls, "_from_config")):
        return False
    if not (remote or any_class_checked):
        return True
    try:
        return bool(cls.is_backend_compatible() or cls._can_set_attn_implementation())
    except Exception:
        return False


def _remote_model_class(refs: list[str], fetch):
    """The first auto_map model class that loads from the (trusted) repo code, or None."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    for ref in refs:
        folder = fetch(ref) if fetch is not None else None
        if folder is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return get_class_from_dynamic_module(ref, str(folder), local_files_only=True)
        except Exception:  # missing packages or broken code: vLLM skips the entry the same way
            continue
    return None


def model_code_fetcher(folder: Path, raw: dict, hub_source: dict | None, params: dict | None, loaded: Loaded):
    """A `fetch(ref)` for transformers_can_build: downloads the repo's modeling code at the pinned commit (or
    finds it in a local folder) and records each file's sha256 in loaded.remote_code."""

    def fetch(ref: str):
        try:
            files = _fetch_remote_files(folder, ref, hub_source, params or {})
        except PrestageError:
            return None
        if loaded.remote_code is None:
            auto_map = raw.get("auto_map")
            loaded.remote_code = {
                "auto_map": dict(sorted(auto_map.items())) if isinstance(auto_map, dict) else auto_map,
                "repo_id": (hub_source or {}).get("repo_id"),
                "commit": (hub_source or {}).get("commit"),
                "files": [],
            }
        have = {f["path"] for f in loaded.remote_code["files"]}
        for f in files:
            if f not in have:
                loaded.remote_code["files"].append({"path": f, "sha256": sha256_hex(folder / f)})
        loaded.remote_code["files"].sort(key=lambda f: f["path"])
        return folder

    return fetch
