"""Loading a tokenizer from a folder the way vLLM does, with every failure as one PrestageError line.

`preflight(folder)` reads tokenizer_config.json and tokenizer.json before transformers does, so that a
malformed file or a `tokenizer_class` transformers does not have is reported by name (transformers 5 would
raise a KeyError, or silently fall back to TokenizersBackend for an unknown class).

`load(folder, mode, trust_remote_code, where)`: mode "hf" is `AutoTokenizer.from_pretrained` (transformers 5
always builds the fast backend when it can); mode "mistral" is transformers' MistralCommonBackend, which
needs the mistral_common package. A repo whose tokenizer is its own code (`auto_map.AutoTokenizer`) loads
only with --trust-remote-code (docs/vllm-rules.md, T-03) when transformers has nothing else to load; when
the repo also has a tokenizer.json, transformers (and so vLLM) loads that without the code and says nothing:
`untrusted_warning` says it. `remote_code(folder, config)` records trusted tokenizer code by sha256.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from prestage.stages import errors, model_json


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json(path: Path, what: str) -> dict | None:
    """A JSON object file, None when absent; anything else is InvalidModelError naming the file."""
    try:
        data = model_json.loads(path.read_text(encoding="utf-8"), f"{what}: {path.name}")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        raise errors.InvalidModelError(
            f"{what}: {path.name} is not valid JSON ({_short(e, 120)}); fix or re-upload the file"
        ) from None
    if not isinstance(data, dict):
        raise errors.InvalidModelError(f"{what}: {path.name} holds a {type(data).__name__}, not a JSON object")
    return data


def auto_map_ref(tokenizer_config: dict | None) -> str | None:
    """The repo's own tokenizer class (`module.Class`) named by auto_map.AutoTokenizer, or None."""
    amap = (tokenizer_config or {}).get("auto_map")
    if isinstance(amap, dict):
        entry = amap.get("AutoTokenizer")
    else:
        entry = amap if isinstance(amap, (list, tuple)) else None  # the legacy [slow, fast] form
    if isinstance(entry, str):
        return entry
    if isinstance(entry, (list, tuple)):
        refs = [r for r in entry if r]
        return refs[-1] if refs else None  # [slow, fast]: transformers 5 prefers the fast one
    return None


def preflight(folder: Path, where: str, mode: str) -> dict | None:
    """Validate tokenizer_config.json and tokenizer.json; return the tokenizer config (or None)."""
    config = read_json(folder / "tokenizer_config.json", where)
    tj = folder / "tokenizer.json"
    if tj.is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_str(tj.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise errors.InvalidModelError(
                f"{where}: tokenizer.json is not a valid tokenizers file ({_short(e, 160)}); fix or re-upload it"
            ) from None
    if mode == "hf" and config and auto_map_ref(config) is None:
        name = config.get("tokenizer_class")
        if isinstance(name, str) and name:
            from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

            candidates = {name, name + "Fast", name.removesuffix("Fast")}
            if all(tokenizer_class_from_name(c) is None for c in candidates):
                raise errors.InvalidModelError(
                    f"{where}: tokenizer_config.json names tokenizer_class '{name}', which transformers does not "
                    "have; fix tokenizer_class, upgrade transformers, or point --tokenizer at a working tokenizer"
                )
    elif (
        mode == "hf"
        and not tj.is_file()
        and not any(folder.glob("*.model"))
        and not (folder / "vocab.json").is_file()
        and not (folder / "vocab.txt").is_file()
        and not (folder / "tekken.json").is_file()
    ):
        raise errors.InvalidModelError(
            f"{where}: no tokenizer files (tokenizer.json, tokenizer_config.json, "
            "vocab or sentencepiece model); pass --tokenizer with a repo that has them"
        )
    return config


def _module_files(folder: Path, ref: str) -> list[str]:
    """The module file `ref` names and what it imports relatively, present in `folder` (sorted)."""
    from transformers.dynamic_module_utils import get_relative_imports

    local = ref.split("--")[-1]
    wanted, done = [local.rsplit(".", 1)[0].replace(".", "/") + ".py"], []
    while wanted:
        name = wanted.pop()
        if name in done or not (folder / name).is_file():
            continue
        done.append(name)
        wanted += [rel.replace(".", "/") + ".py" for rel in get_relative_imports(str(folder / name))]
    return sorted(done)


def remote_code(folder: Path, config: dict | None, trusted: bool) -> dict | None:
    """{auto_map, files: [{path, sha256}]} of the tokenizer code that ran (trusted auto_map), else None."""
    from prestage.stages.digest import sha256_hex

    ref = auto_map_ref(config)
    if ref is None or not trusted:
        return None
    files = _module_files(folder, ref)
    return {"auto_map": ref, "files": [{"path": f, "sha256": sha256_hex(folder / f)} for f in files]}


def untrusted_warning(config: dict | None, trusted: bool, tok) -> str | None:
    """The warning for a repo whose own tokenizer code did not run (no --trust-remote-code) but loaded anyway."""
    ref = auto_map_ref(config)
    if ref is None or trusted:
        return None
    return (
        f"tokenizer_config.json names the repo's own tokenizer code auto_map.AutoTokenizer={ref}, which did not "
        f"run (no --trust-remote-code): loaded as {type(tok).__name__} from the tokenizer files, as vLLM does; "
        "its encodings may differ from the repo's class: pass --trust-remote-code to run the code"
    )


def _untrusted(where: str, config: dict | None) -> errors.UntrustedCodeError:
    ref = auto_map_ref(config) or "a custom tokenizer class"
    module = ref.split("--")[-1].rsplit(".", 1)[0] + ".py" if "." in ref else "its own module"
    return errors.UntrustedCodeError(
        f"{where}: the tokenizer is the repo's own code ({ref}, from {module}); review it, then pass "
        "--trust-remote-code to run it"
    )


def load(folder: Path, mode: str, trust_remote_code: bool, where: str, config: dict | None = None):
    """The tokenizer object for `folder` (already preflighted), or one PrestageError line."""
    if mode == "mistral":
        if importlib.util.find_spec("mistral_common") is None:
            raise errors.UnsupportedError(
                f"{where}: tokenizer mode mistral needs the mistral_common package: "
                "pip install mistral-common (or pass --tokenizer-mode hf)"
            )
        try:
            from mistral_common.protocol.instruct.validator import ValidationMode
            from transformers import MistralCommonBackend

            return MistralCommonBackend.from_pretrained(str(folder), mode=ValidationMode.test, local_files_only=True)
        except Exception as e:
            raise errors.InvalidModelError(
                f"{where}: the Mistral tokenizer failed to load ({type(e).__name__}: {_short(e)})"
            ) from None

    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(folder), trust_remote_code=trust_remote_code, local_files_only=True, truncation_side="left"
        )
    except ValueError as e:
        text = str(e)
        if not trust_remote_code and ("custom code" in text or "trust_remote_code" in text):
            raise _untrusted(where, config) from None
        raise errors.InvalidModelError(f"{where}: the tokenizer failed to load ({_short(e)})") from None
    except ImportError as e:
        missing = getattr(e, "name", None)
        hint = f"pip install {missing}" if missing else "install the package it names"
        raise errors.UnsupportedError(
            f"{where}: loading the tokenizer needs a package that is missing ({_short(e, 160)}); {hint}"
        ) from None
    except errors.PrestageError:
        raise
    except Exception as e:
        raise errors.InvalidModelError(
            f"{where}: the tokenizer failed to load ({type(e).__name__}: {_short(e)}); check its tokenizer files"
        ) from None
