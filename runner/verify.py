"""`prestage verify RUN`: re-hash every file a run's manifests recorded and report each one.

Covers the weight files fetch-weights recorded (in the cache or the local model folder), its index and
npcache files, and the tokenizer files tokenize-prep wrote in the run folder. Unlike the runner's cache
check (presence and size only) this reads every byte. Report rows: {stage, path, where, size, sha256, ok,
reason}; `ok` is False for a missing file, a size or a sha256 that differs from the manifest.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
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


def is_bundle(target) -> bool:
    """Whether `target` names a bundle (a folder holding SHA256SUMS, or a file: a bundle tar) rather than a run."""
    from prestage.runner.oci import is_layout

    p = Path(target)
    return (p.is_dir() and (p / "SHA256SUMS").exists()) or is_layout(p) or p.is_file()


def verify_bundle(path, reporter, verify_key=None) -> tuple[bool, list[dict]]:
    """Re-hash every file of a bundle against its SHA256SUMS (folder: in parallel; tar: in one pass) and check
    every entry is one a bundle may hold (with `verify_key`, the signature of SHA256SUMS first: IntegrityError
    when it does not verify); (all ok, a row per listed file and per refused entry)."""
    import tarfile

    from prestage.runner import checksums
    from prestage.runner.bundle_read import open_verified, problem
    from prestage.stages.fetch_weights.verify import hash_files

    b = open_verified(path, verify_key, reporter, "verify")
    try:
        listing = b.listing
        members = list(b.members())
        files = [m for m in members if m.kind == "file" and m.name in listing and not problem(m, listing)]
        reporter.info(f"verify: hashing {len(files)} file(s), {sum(m.size for m in files) / 1e6:.1f} MB in {b.where}")
        hashed: dict[str, tuple[int, str] | str] = {}
        if b.kind == "dir":
            by_path = hash_files([m.path for m in files], workers=8)
            hashed = {m.name: by_path[m.path] for m in files}
        else:

            def one(m):
                try:
                    return b.hash_member(m)
                except (tarfile.TarError, EOFError) as e:
                    return f"cannot be read ({e}): truncated tar"

            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                hashed = dict(zip([m.name for m in files], pool.map(one, files), strict=True))
    finally:
        b.close()
    report = []
    seen = set()
    for m in members:
        if m.kind == "dir" and not problem(m, listing):
            continue
        seen.add(m.name)
        top = m.name.split("/", 1)[0]
        row = {"stage": top, "path": m.name, "where": b.where, "size": m.size if m.kind == "file" else None}
        row["sha256"] = listing.get(m.name)
        why = problem(m, listing)
        if why:
            row.update(ok=False, reason=why)
        elif m.kind == "link":
            row.update(ok=True, reason=None, link=m.link)
        else:
            got = hashed[m.name]
            if isinstance(got, str):
                row.update(ok=False, reason=got)
            elif got[0] != m.size:
                row.update(ok=False, reason=f"size {got[0]} != {m.size} in the tar header")
            elif got[1] != listing[m.name]:
                row.update(ok=False, reason=f"sha256 {got[1]} != listed {listing[m.name]}")
            else:
                row.update(ok=True, reason=None)
        report.append(row)
    for name in sorted(set(listing) - seen):
        report.append(
            {
                "stage": name.split("/", 1)[0],
                "path": name,
                "where": b.where,
                "size": None,
                "sha256": listing[name],
                "ok": False,
                "reason": f"missing (listed in {checksums.NAME})",
            }
        )
    ok = all(r["ok"] for r in report)
    reporter.info(f"verify: {sum(r['ok'] for r in report)}/{len(report)} entries ok")
    return ok, report
