"""Rendering manifests and status for people (indented text) and for machines (JSON)."""

from __future__ import annotations

import json
from typing import Any

from prestage.stages.units import size_text

_MAX_ITEMS = 40


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def dumps(value: Any) -> str:
    return json.dumps(jsonable(value), indent=2, ensure_ascii=False)


def _scalar(v: Any) -> str:
    if isinstance(v, str):
        return (
            v
            if v and v.strip() == v and "\n" not in v and len(v) < 200
            else json.dumps(v[:200] + ("..." if len(v) > 200 else ""))
        )
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    return json.dumps(v)


def render(value: Any, indent: int = 0, full: bool = False) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                if isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v) and len(v) <= 16:
                    lines.append(f"{pad}{k}: [{', '.join(_scalar(x) for x in v)}]")
                else:
                    lines.append(f"{pad}{k}:")
                    lines.extend(render(v, indent + 1, full))
            else:
                lines.append(f"{pad}{k}: {_scalar(v) if not isinstance(v, (dict, list)) else json.dumps(v)}")
        return lines
    if isinstance(value, list):
        shown = value if full else value[:_MAX_ITEMS]
        for item in shown:
            if isinstance(item, dict) and item and all(not isinstance(x, (dict, list)) for x in item.values()):
                lines.append(f"{pad}- " + ", ".join(f"{k}={_scalar(x)}" for k, x in item.items()))
            elif isinstance(item, (dict, list)):
                sub = render(item, indent + 1, full)
                lines.append(f"{pad}-" + (" " + sub[0].strip() if sub else " {}"))
                lines.extend(sub[1:])
            else:
                lines.append(f"{pad}- {_scalar(item)}")
        if len(value) > len(shown):
            lines.append(f"{pad}... {len(value) - len(shown)} more (use --json or --full)")
        return lines
    return [pad + _scalar(value)]


def manifest_text(doc: dict, path: str, full: bool = False) -> str:
    head = (
        f"{path}\n  stage: {doc['stage']} (v{doc['stage_version']}, schema {doc['schema_version']})\n"
        f"  fingerprint: {doc['fingerprint']}"
    )
    parts = [head]
    for section in ("inputs", "upstream", "outputs", "warnings", "volatile"):
        body = doc.get(section)
        if body:
            parts.append(f"  {section}:\n" + "\n".join(render(body, 2, full)))
    return "\n".join(parts)


def status_text(run: str, rows: list[dict]) -> str:
    width = max(len(r["stage"]) for r in rows)
    lines = [f"run {run}"]
    for r in rows:
        reason = f" ({r['reason']})" if r.get("reason") else ""
        lines.append(f"  {r['stage']:<{width}}  {r['state']}{reason}")
    return "\n".join(lines)


# ---- the compact summary `inspect` shows by default --------------------------------------------------------

_LINE = 110  # a summary line's value is cut to about this many characters
_REASONS = ("note", "why", "reason")  # the fields that say why a decision was made: never cut
_INLINE_ITEMS = 8  # a list of at most this many scalars, or a map of at most this many scalars, fits one line


def _is_scalar(v: Any) -> bool:
    return not isinstance(v, (dict, list))


def _short(v: Any, width: int = _LINE) -> str:
    text = _scalar(v)
    return text if len(text) <= width else text[: width - 3] + "..."


def _mb(n: int) -> str:
    return size_text(n)  # the digits and unit of fetch-weights' log lines and bars


def _summarize_list(key: str, items: list) -> list[str]:
    """One line for a list, or one line per item for the lists a person reads whole (decisions, completions)."""
    if not items:
        return [f"{key}: []"]
    if all(_is_scalar(x) for x in items):
        if len(items) <= _INLINE_ITEMS:
            return [f"{key}: [{_short(', '.join(_scalar(x) for x in items))}]"]
        return [f"{key}: {len(items)} values"]
    dicts = [x for x in items if isinstance(x, dict)]
    if key == "completions":
        return [f"{key}:"] + [
            f"  - {_short(c.get('prompt'), 40)} -> {_short(c.get('text'), 60)} "
            f"({len(c.get('token_ids') or [])} tokens, {c.get('finish_reason')})"
            for c in dicts
        ]
    if dicts and any("why" in x or "reason" in x for x in dicts):  # decisions: each with its reason
        lines = [f"{key}: {len(items)}"]
        for x in dicts:
            what = ", ".join(
                f"{k}={_short(v, 40)}" for k, v in x.items() if k not in ("why", "reason") and _is_scalar(v)
            )
            lines.append(f"  - {what}: {_short(x.get('why') or x.get('reason'), 80)}")
        return lines
    sizes = [x["size"] for x in dicts if isinstance(x.get("size"), int)]
    files = bool(sizes) and all(isinstance(x.get("path"), str) for x in dicts)
    line = f"{key}: {len(items)} {'files' if files else 'items'}" + (f", {_mb(sum(sizes))}" if sizes else "")
    if files and len(dicts) <= _INLINE_ITEMS:  # a few files: their names too
        line += " (" + ", ".join(x["path"] for x in dicts) + ")"
    return [line]


def summarize(value: dict, indent: int = 0, depth: int = 0) -> list[str]:
    """A map as at most a line per key: scalars as they are, small maps on one line, larger ones as a count."""
    pad = "  " * indent
    lines: list[str] = []
    for k, v in value.items():
        if _is_scalar(v):
            lines.append(f"{pad}{k}: {_short(v)}")
        elif isinstance(v, list):
            lines.extend(pad + line for line in _summarize_list(k, v))
        elif not v:
            lines.append(f"{pad}{k}: {{}}")
        elif all(_is_scalar(x) for x in v.values()) and len(v) <= _INLINE_ITEMS:
            reasons = {a: b for a, b in v.items() if a in _REASONS and b}
            lines.append(
                f"{pad}{k}: " + _short(", ".join(f"{a}={_scalar(b)}" for a, b in v.items() if a not in reasons))
            )
            lines.extend(f"{pad}  {a}: {b}" for a, b in reasons.items())  # a decision's reason, in full
        elif depth == 0 and len(v) <= _INLINE_ITEMS:
            lines.append(f"{pad}{k}:")
            lines.extend(summarize(v, indent + 1, depth + 1))
        else:
            lines.append(f"{pad}{k}: {len(v)} entries")
    return lines


def manifest_summary(doc: dict, path: str) -> str:
    """A manifest in a screenful: what went in, the decisions and their reasons, the files with their count and
    bytes, every warning; long maps and lists as counts (`inspect --full` or `--json` shows them whole)."""
    vol = doc.get("volatile") or {}
    took = vol.get("duration_s")
    when = f", ran {vol['started_at']}" if vol.get("started_at") else ""
    when += f" in {took:.2f}s" if isinstance(took, (int, float)) else ""
    parts = [f"{path}\n  stage: {doc['stage']} (v{doc['stage_version']}){when}, fingerprint {doc['fingerprint'][:12]}"]
    if doc.get("upstream"):
        parts.append("  upstream: " + ", ".join(doc["upstream"]))
    inputs = {k: v for k, v in (doc.get("inputs") or {}).items() if v not in (None, [], {}, "")}
    if inputs:
        parts.append("  inputs:\n" + "\n".join(summarize(inputs, 2)))
    outputs = {k: v for k, v in (doc.get("outputs") or {}).items() if v is not None}
    if outputs:
        parts.append("  outputs:\n" + "\n".join(summarize(outputs, 2)))
    warnings = doc.get("warnings") or []
    parts.append("  warnings: none" if not warnings else "  warnings:\n" + "\n".join(f"    - {w}" for w in warnings))
    return "\n".join(parts)


def verify_text(report: list[dict]) -> str:
    """`verify`'s per-file lines: ok, or FAIL with the reason."""
    if not report:
        return "no files recorded"
    width = max(len(r["stage"]) for r in report)
    lines = []
    for r in report:
        size = f" ({_mb(r['size'])})" if isinstance(r.get("size"), int) else ""
        result = "ok  " if r["ok"] else "FAIL"
        why = "" if r["ok"] else f": {r['reason']}"
        lines.append(f"{result}  {r['stage']:<{width}}  {r['path']}{size}{why}")
    bad = sum(not r["ok"] for r in report)
    lines.append(f"{len(report) - bad} of {len(report)} file(s) ok" + (f", {bad} failed" if bad else ""))
    return "\n".join(lines)
