"""fetch-weights' run(): resolve's listing + configure's spec in, the fetch-weights outputs out.

Hub models: index first, selection, then under the download lock the disk check, parallel downloads and
per-file verification (size, sha256 against the hub's LFS sha256, header/tensor index). A hash mismatch
deletes the cached blob and its snapshot link and fails with IntegrityError. Local models: selection and
verification in place (nothing is ever deleted there). Outputs per docs/manifests.md "fetch-weights".
"""

from __future__ import annotations

import time
from pathlib import Path

from prestage.stages import errors, hub, model_json, names, paths
from prestage.stages.base import Context, StageResult
from prestage.stages.digest import sha256_file
from prestage.stages.fetch_weights import download as dl
from prestage.stages.fetch_weights import selection as sel
from prestage.stages.fetch_weights import tensors as tx
from prestage.stages.fetch_weights.file_state import mtimes
from prestage.stages.records import WeightsRecord
from prestage.stages.units import size_text


def fetch(ctx: Context, inputs: dict) -> StageResult:
    resolve = ctx.upstream["resolve"].record
    conf = ctx.upstream["configure"].record
    rep = ctx.reporter
    params = ctx.params
    asked = inputs["load_format"]
    ignore = inputs["ignore_patterns"]
    # the listing as plain maps: selection and the downloader read {path, size, sha256, lfs}
    listing = {f.path: f.to_dict() for f in resolve.files}
    for rel in listing:  # an edited resolve manifest never names a path outside the model's folder
        names.repo_path(rel, "resolve.msgpack files", errors.BadManifestError)
    is_hub = resolve.source == "hub"
    repo_id, commit = resolve.repo_id, resolve.commit
    label = f"{repo_id}@{commit[:12]}" if is_hub else resolve.model or resolve.local_dir
    if is_hub:
        folder_rel, root = hub.snapshot_rel(repo_id, commit), "cache"
    else:
        folder_rel, root = resolve.local_dir, "local"
    outputs = {
        "load_format": asked,
        "root": root,
        "folder": folder_rel,
        "index": None,
        "skipped": [],
        "npcache": None,
        "dummy": None,
    }
    volatile: dict = {}
    t0 = time.perf_counter()

    if asked == "dummy":
        tensors, how = tx.dummy_tensors(conf)
        rep.info(f"fetch-weights: load format dummy: nothing downloaded; {len(tensors)} tensors to fill at launch")
        outputs.update(
            format="dummy",
            files=[],
            tensors=tensors,
            total_bytes=0,
            param_count=tx.param_count(tensors),
            dummy={"shapes_from": how},
        )
        return StageResult(outputs=_record(outputs), volatile={"seconds": round(time.perf_counter() - t0, 3)})

    index_rel = sel.index_needed(asked, listing, ignore)
    if is_hub:
        s = hub.settings(params)
        hub.prepare_env(s)
        if s.offline and index_rel and hub.cached_file(s.cache_dir, repo_id, commit, index_rel) is None:
            # name every file the fetch would need, not just the index that comes first
            guess = sel.select(asked, listing, index=None, ignore_patterns=ignore, model=label)
            dl.offline_check(
                s,
                repo_id,
                commit,
                [{"path": index_rel}] + dl.missing_files(s, repo_id, commit, [listing[p] for p in guess.files]),
            )
        with dl.repo_lock(params.get("download_dir"), repo_id, rep):
            selection, index_rel = _select(
                asked,
                listing,
                ignore,
                index_rel,
                label,
                resolve,
                lambda rel: dl.download_one(s, repo_id, commit, rel, rep, listing.get(rel)),
            )
            files = [listing[p] for p in selection.files]
            missing = dl.missing_files(s, repo_id, commit, files)
            if s.offline:
                dl.offline_check(s, repo_id, commit, missing)
            need = dl.check_disk(s, repo_id, missing) if missing else 0
            if missing:
                rep.info(
                    f"fetch-weights: downloading {len(missing)} of {len(files)} file(s) of {label} "
                    f"({size_text(need)}) into {s.cache_dir}"
                )
            else:
                rep.info(f"fetch-weights: all {len(files)} file(s) of {label} are in the cache")
            snap = dl.snapshot_dir(s, repo_id, commit)
            post = _verifier(listing, snap, delete_bad=True)
            t1 = time.perf_counter()
            results = dl.fetch_parallel(
                s,
                repo_id,
                commit,
                files,
                to_fetch={f["path"] for f in missing},
                post=post,
                max_workers=int(ctx.params.get("max_workers") or 8),
                progress=rep.progress and not _bars_off(),
                need_bytes=need,
                reporter=rep,
            )
            volatile.update(
                downloaded_files=len(missing), downloaded_bytes=need, fetch_seconds=round(time.perf_counter() - t1, 3)
            )
            base = snap
    else:
        base = paths.model_dir(ctx.run_dir, ctx.upstream["resolve"], params)
        selection, index_rel = _select(asked, listing, ignore, index_rel, label, resolve, lambda rel: base / rel)
        files = [listing[p] for p in selection.files]
        post = _verifier(listing, base, delete_bad=False)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, int(ctx.params.get("max_workers") or 8))) as pool:
            checked = pool.map(lambda f: post(f["path"], base / f["path"]), files)
            results = dict(zip(selection.files, checked, strict=True))

    if index_rel:
        ip = base / index_rel
        size, sha = sha256_file(ip)
        outputs["index"] = {"path": index_rel, "size": size, "sha256": sha}
    tensors = tx.merge(results[p]["tensors"] for p in selection.files)
    warnings = tx.check_spec(tensors, conf.spec, conf.config, where=label)  # the runner prints them
    recorded = [
        {"path": p, "size": results[p]["size"], "sha256": results[p]["sha256"], "kind": _kind(p)}
        for p in selection.files
    ]
    outputs.update(
        format=selection.format,
        files=recorded,
        skipped=selection.skipped,
        tensors=tensors,
        total_bytes=sum(f["size"] for f in recorded),
        param_count=tx.param_count(tensors),
    )
    if selection.format == "npcache":
        from prestage.stages.fetch_weights import npcache

        outputs["npcache"] = npcache.build(
            ctx.run_dir, [(p, base / p, results[p]["sha256"]) for p in selection.files], rep
        )
    secs = time.perf_counter() - t0
    volatile.update(seconds=round(secs, 3), folder_abs=str(base), mtime_ns=mtimes(base, selection.files))
    rep.info(
        f"fetch-weights: {selection.format}, {len(recorded)} file(s), {size_text(outputs['total_bytes'])}, "
        f"{len(tensors)} tensors, {outputs['param_count']:,} parameters, verified in {secs:.1f}s"
    )
    return StageResult(outputs=_record(outputs), warnings=warnings, volatile=volatile)


def _record(outputs: dict) -> WeightsRecord:
    return WeightsRecord.from_dict(outputs, "fetch-weights' outputs")


def _select(asked, listing, ignore, index_rel, label, resolve, get_index):
    """Selection with the index read through `get_index(rel) -> path` when one applies."""
    index = None
    try:
        if index_rel:
            path = get_index(index_rel)
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, ValueError) as e:
                raise errors.InvalidModelError(
                    f"{label}: {index_rel} is not readable ({e}); fix or remove the index file"
                ) from None
            index = model_json.loads(text, f"{label}: {index_rel}")
        selection = sel.select(asked, listing, index=index, ignore_patterns=ignore, model=label)
    except errors.UnsupportedError:
        if resolve.listing == "snapshot":
            raise errors.OfflineMissError(
                f"{label}: offline and no weight files for load format '{asked}' are "
                "in the cached snapshot; run once online to fetch them"
            ) from None
        raise
    return selection, selection.index


def _verifier(listing: dict, base: Path, *, delete_bad: bool):
    """post(rel, path): size and sha256 against the listing, then the file's tensor index."""

    def post(rel: str, path: Path) -> dict:
        if not path.is_file():
            raise errors.NotFoundError(f"{rel}: listed by resolve but missing from {base}; re-run resolve")
        want = listing.get(rel) or {}
        size, sha = sha256_file(path)
        bad = None
        if want.get("size") is not None and size != want["size"]:
            bad = f"has {size} bytes, resolve listed {want['size']}"
        elif want.get("sha256") and sha != want["sha256"]:
            bad = f"sha256 {sha} differs from the listed {want['sha256']}"
        if bad:
            if delete_bad:
                dl.remove_cached(base, rel)
                raise errors.IntegrityError(
                    f"{rel}: {bad}; the corrupt copy was deleted from the cache: "
                    "re-run fetch-weights to download it again"
                )
            raise errors.IntegrityError(f"{rel}: {bad}; the local file changed since resolve: re-run resolve")
        return {"size": size, "sha256": sha, "tensors": tx.index_file(path, rel, _kind_for_index(rel))}

    return post


def _bars_off() -> bool:
    return hub.env_true("HF_HUB_DISABLE_PROGRESS_BARS")


def _kind(path: str) -> str:
    return "safetensors" if path.endswith(".safetensors") else path.rsplit(".", 1)[-1]


def _kind_for_index(rel: str) -> str:
    return "safetensors" if rel.endswith(".safetensors") else "torch"
