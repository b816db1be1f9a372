"""Rendering manifests and status for people (indented text) and for machines (JSON)."""

from __future__ import annotations

import json
from typing import Any

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
