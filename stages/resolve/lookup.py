"""resolve's work: read a local folder, or pin a hub revision and list its files (cache first, hub last).

`resolve_local(ctx, inputs)`: the folder's files and config format. `resolve_hub(ctx, inputs)`: the commit
the revision points to and the repo's listing with sizes and LFS sha256: from the cache's refs/ and the
listing prestage keeps under `<cache>/.prestage/listings/` when they hold it, else one repo-info call to the
hub, then config.json into the cache. Offline, only the cache (a partial listing read off the snapshot
when prestage's own is missing). A branch taken from the cache is said on stderr ("main -> <commit> (from
the cache, resolved <date>; --refresh asks the hub)"); `--refresh` or `--force` ask the hub for the
branch's current commit first, as `hf download` does.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from prestage.stages import errors, hub, names
from prestage.stages.base import Context, StageResult
from prestage.stages.digest import sha256_hex
from prestage.stages.manifest import write_atomic
from prestage.stages.records import RepoFile, ResolveRecord

# huggingface_hub's repo-id rule: "name" or "namespace/name", no "--" or "..", not ending in ".git".


def offline_reason(params: dict) -> str | None:
    """What turned offline mode on (the flag or the variable), or None when online."""
    if params.get("offline"):
        return "--offline"
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if hub.env_true(var):
            return f"{var}=1"
    return None


def from_cache_note(revision: str, commit: str, when: float | None, fallback: str | None = None) -> str:
    """The line that says a branch's commit came from the cache, not from the hub."""
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when)) if when is not None else (fallback or "earlier")
    return f"{revision} -> {commit} (from the cache, resolved {date}; --refresh asks the hub)"


def is_local(model: str) -> bool:
    try:
        return Path(model).expanduser().exists()
    except OSError:  # a name too long for the file system (ENAMETOOLONG) is no folder
        return False


def detect_format(requested: str, paths: set[str], where: str) -> tuple[str, str]:
    """(config_format, config_file) from the repo's file paths, as vLLM's `get_config` decides it."""
    has_consolidated = any(re.fullmatch(r"consolidated.*\.safetensors", p.rsplit("/", 1)[-1]) for p in paths)
    if requested == "mistral":
        if "params.json" not in paths:
            raise errors.NotFoundError(
                f"{where}: --config-format mistral but there is no params.json; use --config-format hf or auto"
            )
        return "mistral", "params.json"
    if requested == "auto" and has_consolidated and "params.json" in paths:
        return "mistral", "params.json"
    if "config.json" in paths:
        return "hf", "config.json"
    found = ", ".join(sorted(p for p in paths if "/" not in p)[:8]) or "no files"
    raise errors.NotFoundError(
        f"{where}: no config.json (nor a Mistral params.json beside "
        f"consolidated*.safetensors); found {found}; point at a model folder or repo"
    )


def _listing_path(cache_dir: Path, repo_id: str, commit: str) -> Path:
    return Path(cache_dir) / ".prestage" / "listings" / ("models--" + repo_id.replace("/", "--")) / f"{commit}.json"


def resolve_local(ctx: Context, inputs: dict) -> StageResult:
    folder = (ctx.run_dir / inputs["local_dir"]).resolve()
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            files.append({"path": rel, "size": p.stat().st_size, "sha256": None, "lfs": False})
    fmt, cfg = detect_format(inputs["config_format"], {f["path"] for f in files}, inputs["model"])
    record = ResolveRecord(
        source="local",
        model=inputs["model"],
        repo_id=None,
        revision=None,
        commit=None,
        local_dir=inputs["local_dir"],
        snapshot=None,
        config_format=fmt,
        config_file=cfg,
        config_sha256=sha256_hex(folder / cfg),
        listing="local",
        files=[RepoFile(**f) for f in files],
    )
    return StageResult(outputs=record, volatile={"model_dir": str(folder)})


# ---- hub id ----------------------------------------------------------------------------------


def resolve_hub(ctx: Context, inputs: dict) -> StageResult:
    repo, rev = inputs["repo_id"], inputs["revision"]
    where = f"{repo}@{rev}"
    if not names.is_repo_id(repo):
        shown = repo if len(repo) <= 120 else repo[:117] + "..."
        raise errors.NotFoundError(
            f"{shown}: not a local folder and not a valid hub id (org/name); check the path or the id"
        )
    names.revision(rev)
    s = hub.settings(ctx.params)
    warnings: list[str] = []
    branch = not hub.SHA_RE.match(rev)  # a branch or a tag: the commit it names may move
    if branch and ctx.params.get("refresh") and s.offline:
        raise errors.OfflineMissError(
            f"{where}: --refresh asks the hub for the current commit of '{rev}', but offline mode is on; "
            "drop --refresh to use the cached commit, or go online"
        )
    ask = branch and not s.offline and bool(ctx.params.get("refresh") or ctx.params.get("force"))
    cached_commit = hub.read_ref(s.cache_dir, repo, rev)
    commit = None if ask else cached_commit
    listing = _cached_listing(s.cache_dir, repo, commit) if commit else None
    source = "full"  # prestage's stored copy of the hub's listing: the same content as asking again
    fetched = False
    if listing is None and s.offline:
        if commit is None:
            raise errors.OfflineMissError(
                f"{where}: offline and revision '{rev}' is not in the cache {s.cache_dir}; run once online to fetch it"
            )
        if not (Path(s.cache_dir) / hub.snapshot_rel(repo, commit)).is_dir():
            # a 40-hex --revision is its own commit, but offline it must also be in the cache
            raise errors.OfflineMissError(
                f"{where}: offline and commit {commit} is not in the cache {s.cache_dir}; run once online to fetch it"
            )
        listing = _snapshot_listing(s.cache_dir, repo, commit)
        source = "snapshot"
        warnings.append(
            "offline: the file listing was read off the cached snapshot (no sizes or sha256 "
            "for files not downloaded yet); resolve online once for the full listing"
        )
    client = None if s.offline else hub.HubClient(s, ctx.reporter)
    if listing is None:
        commit, listing = _hub_listing(client, repo, rev)
        fetched = True
    if branch:
        if fetched:
            moved = f"; the cache had {cached_commit[:12]}" if cached_commit and cached_commit != commit else ""
            ctx.reporter.info(f"resolve: {rev} -> {commit} (asked the hub{moved})")
        else:
            when = hub.ref_time(s.cache_dir, repo, rev)
            ctx.reporter.info(f"resolve: {from_cache_note(rev, commit, when)}")
    fmt, cfg = detect_format(inputs["config_format"], {f["path"] for f in listing}, where)
    entry = next((f for f in listing if f["path"] == cfg), None)
    # a cached config is checked against the listing before it is used (a corrupt copy is deleted: integrity)
    path = hub.verify_cached(s.cache_dir, repo, commit, cfg, entry)
    if path is None:
        if s.offline:
            raise errors.OfflineMissError(
                f"{where}: {cfg} is not in the cache {s.cache_dir} and offline mode is on; run once online to fetch it"
            )
        path = client.download(repo, cfg, commit, revision=rev, expect=entry)
    hub.write_ref(s.cache_dir, repo, rev, commit, asked=fetched)
    if fetched:
        lp = _listing_path(s.cache_dir, repo, commit)
        write_atomic(lp, json.dumps(listing, sort_keys=True).encode())
    record = ResolveRecord(
        source="hub",
        model=inputs["model"],
        repo_id=repo,
        revision=rev,
        commit=commit,
        local_dir=None,
        snapshot=hub.snapshot_rel(repo, commit),
        config_format=fmt,
        config_file=cfg,
        config_sha256=sha256_hex(path),
        listing=source,
        files=[
            RepoFile(
                path=f["path"],
                size=f.get("size"),
                sha256=f.get("sha256"),
                lfs=bool(f.get("lfs")),
                blob_id=f.get("blob_id"),
            )
            for f in listing
        ],
    )
    # cache_dir: the cache root used, a host path (stages/paths.py takes it as a hint, never a decision)
    volatile = {
        "cache_dir": str(s.cache_dir),
        "offline": s.offline,
        "endpoint": s.endpoint,
        "token": s.token_state,
        "listing_from": "hub" if fetched else "cache",
    }
    if branch:  # when the cache learnt (or the hub last confirmed) the branch's commit
        when = hub.ref_time(s.cache_dir, repo, rev)
        volatile["ref_written_at"] = None if when is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    return StageResult(outputs=record, warnings=warnings, volatile=volatile)


def _cached_listing(cache_dir: Path, repo: str, commit: str) -> list | None:
    try:
        data = json.loads(_listing_path(cache_dir, repo, commit).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, list) and all(_listing_entry_ok(f) for f in data)
    return data if ok else None  # an edited or older listing is asked again


def _listing_entry_ok(f) -> bool:
    if not isinstance(f, dict) or "blob_id" not in f:
        return False
    try:
        names.repo_path(f.get("path"), "listing")
    except errors.PrestageError:
        return False
    return all(f.get(k) is None or isinstance(f[k], str) for k in ("sha256", "blob_id")) and (
        f.get("size") is None or (isinstance(f["size"], int) and not isinstance(f["size"], bool))
    )


def _snapshot_listing(cache_dir: Path, repo: str, commit: str) -> list:
    snap = Path(cache_dir) / hub.snapshot_rel(repo, commit)
    files = []
    for p in sorted(snap.rglob("*")):
        if p.is_file():
            blob = p.resolve().name
            sha = blob if names.SHA256_RE.match(blob) else None
            files.append(
                {
                    "path": p.relative_to(snap).as_posix(),
                    "size": p.stat().st_size,
                    "sha256": sha,
                    "lfs": sha is not None,
                    "blob_id": blob if names.GIT_OID_RE.match(blob) else None,
                }
            )
    return files


def _hub_listing(client: hub.HubClient, repo: str, rev: str) -> tuple[str, list]:
    info = client.repo_info(repo, rev, files_metadata=True)
    files = []
    for sib in info.siblings or []:
        # every name and id the hub sends is checked before it can become a path or a comparison
        path = names.repo_path(sib.rfilename, f"{repo}@{rev} listing")
        lfs = getattr(sib, "lfs", None)
        sha = getattr(lfs, "sha256", None) if lfs else None
        blob_id = getattr(sib, "blob_id", None)
        if (sha is not None and not names.SHA256_RE.match(str(sha))) or (
            blob_id is not None and not names.GIT_OID_RE.match(str(blob_id))
        ):
            raise errors.IntegrityError(
                f"{repo}@{rev} listing: {path} has sha256 {str(sha)[:80]!r} / blob id {str(blob_id)[:80]!r}, not "
                "hex digests; check HF_ENDPOINT points at a Hugging Face hub"
            )
        size = sib.size if isinstance(sib.size, int) and not isinstance(sib.size, bool) and sib.size >= 0 else None
        files.append({"path": path, "size": size, "sha256": sha, "lfs": lfs is not None, "blob_id": blob_id})
    files.sort(key=lambda f: f["path"])
    if not isinstance(info.sha, str) or not hub.SHA_RE.match(info.sha):
        raise errors.NetworkError(f"{repo}@{rev}: the hub did not give a commit for this revision; check HF_ENDPOINT")
    return info.sha, files
