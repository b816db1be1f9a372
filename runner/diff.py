"""`prestage diff A B`: field by field, what differs between two runs, bundles or manifest files.

Each side is read as {stage: manifest document}: a run folder (or a run name under --artifacts), a bundle
(folder or tar: its run/*.msgpack, read without trusting anything else in it), or one manifest file.
Documents are flattened to dotted fields (`outputs.files[3].sha256`); lists of maps are compared item by
item, lists of plain values as one value. The `volatile` section (times, host, library versions) is left
out unless `volatile=True`. Importable without the heavy libraries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prestage.stages import ORDER, errors
from prestage.stages.manifest import SUFFIX, loads, manifest_path, read

_MISSING = "<absent>"


def load_side(target: str, run_dir_of) -> tuple[str, dict[str, dict]]:
    """(what it is, {stage: manifest dict}) for a run, a bundle or a manifest file."""
    from prestage.runner.verify import is_bundle

    p = Path(target)
    if p.is_file() and p.suffix == SUFFIX:
        m = read(p)
        return "manifest", {m.stage: m.to_dict()}
    if is_bundle(target):
        from prestage.runner.bundle_read import open_bundle

        b = open_bundle(p)
        try:
            docs = {}
            for stage in ORDER:
                name = f"run/{stage}{SUFFIX}"
                if name in b.listing:
                    docs[stage] = loads(b.read(name), f"{b.where}: {name}").to_dict()
        finally:
            b.close()
        return "bundle", docs
    run_dir = run_dir_of(target)
    docs = {n: read(manifest_path(run_dir, n)).to_dict() for n in ORDER if manifest_path(run_dir, n).exists()}
    if not docs:
        raise errors.NotFoundError(
            f"{target}: not a manifest file, a bundle or a run with manifests (looked in {run_dir})"
        )
    return "run", docs


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted field: plain value}; maps and lists of maps are walked, other lists kept whole."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        if not value and prefix:
            out[prefix] = {}
        for k in value:
            out.update(flatten(value[k], f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = value
    return out


def diff(a: dict[str, dict], b: dict[str, dict], volatile: bool = False) -> list[dict]:
    """Rows {stage, field, a, b} for every field that differs (a stage only one side has is one row)."""
    rows = []
    for stage in [s for s in ORDER if s in a or s in b]:
        if stage not in a or stage not in b:
            rows.append(
                {
                    "stage": stage,
                    "field": "(manifest)",
                    "a": "present" if stage in a else _MISSING,
                    "b": "present" if stage in b else _MISSING,
                }
            )
            continue
        fa, fb = (flatten({k: v for k, v in d.items() if volatile or k != "volatile"}) for d in (a[stage], b[stage]))
        for field in sorted(set(fa) | set(fb)):
            va, vb = fa.get(field, _MISSING), fb.get(field, _MISSING)
            if va != vb:
                rows.append({"stage": stage, "field": field, "a": va, "b": vb})
    return rows


def _short(v: Any) -> str:
    text = repr(v) if not isinstance(v, str) else v
    return text if len(text) <= 80 else text[:77] + "..."


def diff_text(a_name: str, b_name: str, rows: list[dict], volatile: bool) -> str:
    scope = "all fields" if volatile else "all fields but volatile"
    if not rows:
        return f"same: {a_name} and {b_name} agree on {scope}"
    lines = [f"{len(rows)} difference(s) between {a_name} (a) and {b_name} (b), {scope}:"]
    for r in rows:
        lines.append(f"  {r['stage']}: {r['field']}: a={_short(r['a'])}  b={_short(r['b'])}")
    return "\n".join(lines)
