"""`prestage verify RUN`: re-hash every file a run's manifests recorded and report each one.

Covers the weight files fetch-weights recorded (in the cache or the local model folder), its index and
npcache files, and the tokenizer files tokenize-prep wrote in the run folder. Unlike the runner's cache
check (presence and size only) this reads every byte. Report rows: {stage, path, where, size, sha256, ok,
reason}; `ok` is False for a missing file, a size or a sha256 that differs from the manifest.
"""

from __future__ import annotations

from pathlib import Path

from prestage.stages import errors, paths
from prestage.stages.manifest import manifest_path, read
from prestage.stages.records import record_of
from prestage.stages.units import size_text


def _rows(run_dir: Path, params: dict) -> list[tuple]:
    """(stage, recorded entry, absolute path, where) for every recorded file, without reading any of them."""
    rows = []
    fw_path = manifest_path(run_dir, "fetch-weights")
    if fw_path.exists():
        m = read(fw_path)
        rec = record_of(m, str(fw_path))
        resolve_path = manifest_path(run_dir, "resolve")
        resolve = read(resolve_path) if resolve_path.exists() else None
        if rec.format != "dummy":
            base = paths.weights_dir(run_dir, m, resolve, params)
            recorded = list(rec.files) + ([rec.index] if rec.index else [])
            for f in recorded:
                rows.append(("fetch-weights", f, paths.inside(base, f.path, "fetch-weights file"), str(base)))
        for f in rec.npcache.files if rec.npcache else []:
            rows.append(("fetch-weights", f, paths.in_run(run_dir, f.path, "npcache file"), "run"))
    tp_path = manifest_path(run_dir, "tokenize-prep")
    if tp_path.exists():
        rec = record_of(read(tp_path), str(tp_path))
        for f in rec.files:
            rows.append(("tokenize-prep", f, paths.in_run(run_dir, f.path, "stored tokenizer file"), "run"))
    return rows


def verify_run(run_dir, params: dict, reporter) -> tuple[bool, list[dict]]:
    """Re-hash every recorded file in parallel; (all ok, per-file report in manifest order)."""
    from prestage.stages.fetch_weights.verify import hash_files

    run_dir = Path(run_dir)
    if not any(manifest_path(run_dir, n).exists() for n in ("fetch-weights", "tokenize-prep")):
        raise errors.NotFoundError(
            f"run {run_dir} has no fetch-weights or tokenize-prep manifest: nothing to "
            f"verify; run `prestage fetch-weights {run_dir.name}` first"
        )
    rows = _rows(run_dir, params or {})
    present = [p for _, _, p, _ in rows if p.is_file()]
    total = sum(p.stat().st_size for p in present)
    reporter.info(f"verify: hashing {len(present)} file(s), {size_text(total)}")
    hashed = hash_files(present, workers=8)
    report = []
    for stage, f, p, where in rows:
        row = {"stage": stage, "path": f.path, "where": where, "size": f.size, "sha256": f.sha256}
        if p not in hashed:
            row.update(ok=False, reason="missing")
        else:
            size, sha = hashed[p]
            if size != f.size:
                row.update(ok=False, reason=f"size {size} != recorded {f.size}")
            elif sha != f.sha256:
                row.update(ok=False, reason=f"sha256 {sha} != recorded {f.sha256}")
            else:
                row.update(ok=True, reason=None)
        report.append(row)
    ok = all(r["ok"] for r in report)
    reporter.info(f"verify: {sum(r['ok'] for r in report)}/{len(report)} file(s) ok")
    return ok, report
