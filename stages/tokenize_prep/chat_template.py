"""Chat template resolution as vLLM does it (docs/vllm-rules.md, §4.7).

`template_input(arg)` normalizes `--chat-template` for the manifest inputs: a readable file (its path as
typed and the sha256 of its bytes), a literal Jinja template (its sha256), or a bare word that is neither
(kept as a possible name of one of the tokenizer's own templates, e.g. "tool_use"; otherwise an error).

`resolve(tok, arg, model_type)` returns (template text or None, source, warnings). Priority: an explicit
--chat-template, then the tokenizer's own (a dict of named templates gives its "default"), then vLLM's
built-in fallback by model_type. prestage ships none of vLLM's built-in files: those model types get no
template and a warning naming the file vLLM would use. No template at all is a warning, not an error
(case T-07): chat requests fail later, completions still work. vLLM's AutoProcessor step (multimodal repos
only) is not reproduced.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from prestage.stages import errors

# vLLM's fallback by hf_config.model_type (transformers_utils/chat_templates/registry.py).
BUILTIN_FALLBACK = {
    "blip-2": "template_blip2.jinja",
    "clip": "template_basic.jinja",
    "colpali": "template_basic.jinja",
    "paligemma": "template_basic.jinja",
    "siglip": "template_basic.jinja",
    "siglip2": "template_basic.jinja",
    "deepseek_ocr": "template_deepseek_ocr.jinja",
    "deepseek_ocr2": "template_deepseek_ocr.jinja",
    "unlimited-ocr": "template_deepseek_ocr.jinja",
    "unlimited_ocr": "template_deepseek_ocr.jinja",
    "deepseek_vl_v2": "template_deepseek_vl2.jinja",
    "minicpmv": "template_minicpmv45.jinja or template_chatml.jinja",
    "minicpm_ocr": "template_minicpmv45.jinja or template_chatml.jinja",
    "minicpmv4_6": "template_minicpmv45.jinja or template_chatml.jinja",
    "minicpmv4_7": "template_minicpmv45.jinja or template_chatml.jinja",
}


def _looks_literal(arg: str) -> bool:
    return any(c in arg for c in "{}\n")


def _read(arg: str) -> bytes | None:
    """The file's bytes, None when `arg` does not name a file; unreadable files are a UsageError."""
    p = Path(arg).expanduser()
    try:
        return p.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except IsADirectoryError:
        raise errors.UsageError(
            f"--chat-template {arg}: is a directory; pass a Jinja file or a literal template"
        ) from None
    except OSError as e:
        if _looks_literal(arg):  # a long literal template is no file name (ENAMETOOLONG)
            return None
        raise errors.UsageError(
            f"--chat-template {arg}: cannot read the file ({e.strerror}); fix its permissions or pass another file"
        ) from None


def template_input(arg: str | None) -> dict | None:
    """The normalized --chat-template for the manifest inputs (never the template text itself)."""
    if not arg:
        return None
    data = _read(arg)
    if data is not None:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise errors.UsageError(
                f"--chat-template {arg}: the file is not UTF-8 text; pass a Jinja template file"
            ) from None
        return {"kind": "file", "value": arg, "sha256": hashlib.sha256(data).hexdigest()}
    if _looks_literal(arg):
        return {"kind": "literal", "value": None, "sha256": hashlib.sha256(arg.encode()).hexdigest()}
    return {"kind": "name", "value": arg, "sha256": None}


def _not_a_file(arg: str) -> errors.UsageError:
    return errors.UsageError(
        f"--chat-template {arg}: looks like a file path but cannot be opened (and is not "
        "a template name of this tokenizer); pass an existing file or a literal Jinja "
        "template"
    )


def resolve(tok, arg: str | None, spec: dict | None, model_type: str | None):
    """(text or None, source, warnings); `spec` is template_input(arg) as recorded in the inputs."""
    own = getattr(tok, "chat_template", None)
    if spec:
        if spec["kind"] == "file":
            data = _read(arg)
            if data is None:
                raise _not_a_file(arg)
            return data.decode("utf-8"), "cli-file", []
        if spec["kind"] == "literal":
            return arg, "cli-literal", []
        if isinstance(own, dict) and arg in own:
            return own[arg], f"tokenizer:{arg}", []
        raise _not_a_file(arg)

    warnings = []
    if isinstance(own, str) and own:
        return own, "tokenizer", []
    if isinstance(own, dict) and own:
        if "default" in own:
            return own["default"], "tokenizer:default", []
        warnings.append(
            f"the tokenizer has chat templates {sorted(own)} but none named 'default'; pass "
            "--chat-template NAME to pick one"
        )
    builtin = BUILTIN_FALLBACK.get(model_type or "")
    if builtin:
        warnings.append(
            f"no chat template: vLLM would use its built-in {builtin} for model_type '{model_type}', "
            "which prestage does not ship; pass --chat-template FILE"
        )
    else:
        warnings.append(
            "no chat template in the tokenizer: chat requests will fail (completions still work); "
            "pass --chat-template FILE to add one"
        )
    return None, "none", warnings
