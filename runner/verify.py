"""`prestage verify RUN`: re-hash every file a run's manifests recorded and report each one.

Covers the weight files fetch-weights recorded (in the cache or the local model folder), its index and
npcache files, and the tokenizer files tokenize-prep wrote in the run folder. Unlike the runner's cache
check (presence and size only) this reads every byte. Report rows: {stage, path, where, size, sha256, ok,
reason}; `ok` is False for a missing file, a size or a sha256 that differs from the manifest.
"""

from __future__ import annotations

from pathlib import Path

from prestage.stages import errors
from prestage.stages.fetch_weights.stage import FetchWeightsStage
from prestage.stages.manifest import manifest_path, read


def _rows(run_dir: Path, params: dict) -> list[dict]:
    """(stage, recorded entry, absolute path) for every recorded file, without reading any of them."""
    rows = []
    fw_path = manifest_path(run_dir, "fetch-weights")
    if fw_path.exists():
        m = read(fw_path)
        out = m.outputs
        base = FetchWeightsStage.folder(run_dir, m)
        if params.get("download_dir") and out.get("root") == "cache" and out.get("folder"):
            base = Path(params["download_dir"]).expanduser().absolute() / out["folder"]  # --download-dir wins
        recorded = list(out.get("files") or [])
        if out.get("index"):
            recorded.append(out["index"])
        for f in recorded:
            rows.append(("fetch-weights", f, base / f["path"], str(base)))
        for f in (out.get("npcache") or {}).get("files") or []:
            rows.append(("fetch-weights", f, run_dir / f["path"], "run"))
    tp_path = manifest_path(run_dir, "tokenize-prep")
    if tp_path.exists():
        out = read(tp_path).outputs
        tok_dir = out.get("tokenizer_dir") or "tokenizer"
        for f in out.get("files") or []:
            p = run_dir / f["path"]
            if not p.exists() and (run_dir / tok_dir / f["path"]).exists():
                p = run_dir / tok_dir / f["path"]
            rows.append(("tokenize-prep", f, p, "run"))
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
    reporter.info(f"verify: hashing {len(present)} file(s), {total / 1e6:.1f} MB")
    hashed = hash_files(present, workers=8)
    report = []
    for stage, f, p, where in rows:
        row = {"stage": stage, "path": f["path"], "where": where, "size": f.get("size"), "sha256": f.get("sha256")}
        if p not in hashed:
            row.update(ok=False, reason="missing")
        else:
            size, sha = hashed[p]
            if f.get("size") is not None and size != f["size"]:
                row.update(ok=False, reason=f"size {size} != recorded {f['size']}")
            elif f.get("sha256") and sha != f["sha256"]:
                row.update(ok=False, reason=f"sha256 {sha} != recorded {f['sha256']}")
            else:
                row.update(ok=True, reason=None)
        report.append(row)
    ok = all(r["ok"] for r in report)
    reporter.info(f"verify: {sum(r['ok'] for r in report)}/{len(report)} file(s) ok")
    return ok, report
