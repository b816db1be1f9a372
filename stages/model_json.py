"""JSON from a model's files (config.json, params.json, tokenizer configs, a safetensors index), read with bounds.

`loads(text, where)` parses and then walks the value without recursion, refusing with a one-line
InvalidModelError what later code could not handle: nesting deeper than `MAX_DEPTH` (the parser's own
recursion limit is turned into the same error), and integers that do not fit in 64 bits (a manifest is
msgpack, which stores nothing wider). A config that passes is safe to copy, compare and record.

Importable without torch, transformers or huggingface_hub.
"""

from __future__ import annotations

import json
from typing import Any

from prestage.stages.errors import InvalidModelError

MAX_DEPTH = 64  # real configs nest 3 or 4 deep; tokenizer.json about 6
INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # what msgpack stores


def loads(text: str | bytes, where: str) -> Any:
    """The parsed JSON value; InvalidModelError naming `where` when it is malformed, too deep or holds an
    integer wider than 64 bits."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise InvalidModelError(
            f"{where}: JSON nested deeper than the parser allows; fix or re-download the file"
        ) from None
    except ValueError as e:
        raise InvalidModelError(f"{where} is not valid JSON ({e}); fix or re-download the file") from None
    check(value, where)
    return value


def check(value: Any, where: str) -> None:
    """Walk `value` with an explicit stack: depth at most MAX_DEPTH, every integer within 64 bits."""
    stack = [(value, 1, "")]
    while stack:
        v, depth, path = stack.pop()
        if isinstance(v, dict):
            items = v.items()
        elif isinstance(v, list):
            items = enumerate(v)
        else:
            if isinstance(v, int) and not isinstance(v, bool) and not INT_MIN <= v <= INT_MAX:
                shown = str(v) if len(str(v)) <= 24 else f"{str(v)[:12]}...({len(str(v))} digits)"
                raise InvalidModelError(f"{where}: {path or 'value'}={shown} does not fit in 64 bits; fix the file")
            continue
        if depth > MAX_DEPTH:
            raise InvalidModelError(
                f"{where}: JSON nested more than {MAX_DEPTH} levels deep (at {path or 'the top'}); fix or "
                "re-download the file"
            )
        for k, item in items:
            if isinstance(item, (dict, list)) or isinstance(item, int):
                stack.append((item, depth + 1, f"{path}.{k}" if path else str(k)))
