"""`prestage unbundle PATH`: place a bundle's run and model files, checking everything before placing anything.

Order of work:
    1. read SHA256SUMS (with --verify-key, check its signature first) and bundle.json; refuse a run name
       or a model folder that is already taken (usage);
    2. check every entry: a safe name SHA256SUMS lists, a regular file or a snapshot link to a listed blob
       (no absolute path, no `..`, no link leading outside, no device file, no hard link);
    3. copy each file into a staging folder (`.prestage-unbundle-<pid>` inside the target artifacts folder
       and inside the target cache, so the final renames stay on one filesystem), in the kernel where the
       OS allows, and hash each copy on a thread pool while the next one is copied (the pool first asks the
       kernel to start writing the copy to disk, runner/flush.py); a blob the target cache already holds is
       hashed there and skipped when it matches;
    4. check the staged manifests: each one whole, and each one's upstream digests equal to the manifests
       beside it (an edited manifest is refused), and the weight files' listed sha256 equal to what
       fetch-weights recorded;
    5. sync the staging folders' filesystems once (every staged byte on disk, so a crash after a rename
       finds whole files); only then rename into place: blobs, snapshot links, refs, the local model folder,
       and last the run folder in one rename; then sync once more, so a finished unbundle is on disk. An
       interrupted unbundle leaves at most a dot-named staging folder (removed by the next unbundle) and
       blobs no snapshot points to: nothing a launch could use.
Any failure in 1-4 is one line with its exit code (integrity 10 for the bundle's content, usage 2 for the
target) and nothing placed. No manifest is rewritten: the run works from wherever it is placed because
manifests hold no absolute path (stages/paths.py finds the cache through HF_HUB_CACHE or --download-dir).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prestage.runner import checksums, flush
from prestage.runner.arguments import check_run_name
from prestage.runner.bundle_read import meta_of, open_verified, problem
from prestage.stages import ORDER, errors
from prestage.stages.digest import sha256_file
from prestage.stages.manifest import loads, pid_alive

_STAGING = re.compile(r"^\.prestage-unbundle-(\d+)$")


def _staging(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for p in root.iterdir():  # a killed unbundle's leftovers
        m = _STAGING.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
    d = root / f".prestage-unbundle-{os.getpid()}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    return d


def _inside(root: Path, path: Path) -> bool:
    root, path = os.path.abspath(root), os.path.abspath(path)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class _Targets:
    """Where each bundle name goes and where it is staged."""

    def __init__(self, artifacts: Path, hub_cache: Path, run: str, model_dir: Path | None):
        self.artifacts, self.hub_cache, self.run = Path(artifacts).absolute(), Path(hub_cache).absolute(), run
        self.run_dir = self.artifacts / run
        self.model_dir = model_dir
        self.stage_art: Path | None = None
        self.stage_hub: Path | None = None

    def staged(self, name: str) -> Path:
        top, _, rest = name.partition("/")
        if top == "hub":
            return self.stage_hub / rest
        return self.stage_art / name  # run/..., model/...

    def final(self, name: str) -> Path:
        top, _, rest = name.partition("/")
        if top == "hub":
            return self.hub_cache / rest
        if top == "model":
            return self.model_dir / rest
        return self.run_dir / rest


def _check_target(meta: dict, where: str, artifacts: Path, run: str | None, model_dir) -> tuple[str, Path | None]:
    """The run name and the local model folder to use; UsageError when the target is taken or unsafe."""
    name = run or meta.get("run")
    if not isinstance(name, str):
        raise errors.IntegrityError(f"{where}: bundle.json names no run; the bundle is damaged")
    name = check_run_name(name, "--run" if run else "the bundle's run name")
    run_dir = Path(artifacts).absolute() / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise errors.UsageError(
            f"run folder {run_dir} already exists and is not empty; pass --run NEWNAME or another --artifacts DIR"
        )
    if meta.get("source") != "local":
        return name, None
    local = meta.get("local_dir")
    if not isinstance(local, str) or not local or local.startswith("/"):
        raise errors.IntegrityError(f"{where}: bundle.json has no relative local_dir for its local model")
    recorded = Path(os.path.normpath(run_dir / local))
    if model_dir is not None and Path(os.path.normpath(Path(model_dir).absolute())) != recorded:
        raise errors.UsageError(
            f"--model-dir {model_dir}: the run records its model folder as {local!r} from the run folder, i.e. "
            f"{recorded} (manifests are never rewritten); pass --model-dir {recorded} or another --artifacts"
        )
    if model_dir is None and not _inside(Path(artifacts).absolute(), recorded):
        raise errors.UsageError(
            f"the run's local model folder goes to {recorded} (recorded as {local!r} from the run folder), outside "
            f"--artifacts {artifacts}; pass --model-dir {recorded} to place it there"
        )
    if recorded.exists() and any(recorded.iterdir()):
        raise errors.UsageError(f"model folder {recorded} already exists and is not empty; remove it or move it away")
    return name, recorded


def _stage_file(b, m, t: _Targets, listing: dict, skipped: list, hashing):
    """Copy one listed file into staging and hand its check (size, sha256) to the `hashing` pool, which hashes
    the staged copy while the next file is copied; the future of the check. A blob the target cache already
    holds with the listed sha256 is skipped (None)."""
    want = listing[m.name]
    final = t.final(m.name)
    if m.name.startswith("hub/") and "/blobs/" in m.name and final.is_file() and not final.is_symlink():
        if sha256_file(final)[1] == want:
            skipped.append(m.name)
            return None
    dst = t.staged(m.name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        b.copy_to(m, dst)
    except (tarfile.TarError, EOFError) as e:
        raise errors.IntegrityError(f"{b.where}: {m.name}: cannot be read ({e}); the tar is truncated") from None
    return hashing.submit(lambda: _check_staged(b, m, dst, *_flush_and_hash(dst), want))


def _flush_and_hash(dst: Path) -> tuple[int, str]:
    """Start writing the staged copy to disk (the final sync then waits for little), then hash it."""
    fd = os.open(dst, os.O_RDONLY)
    try:
        flush.start_writeback(fd)
    finally:
        os.close(fd)
    return sha256_file(dst)


def _check_staged(b, m, dst: Path, size: int, sha: str, want: str) -> None:
    if size != m.size:
        raise errors.IntegrityError(f"{b.where}: {m.name}: {size} of {m.size} bytes; the bundle is truncated")
    if sha != want:
        raise errors.IntegrityError(
            f"{b.where}: {m.name}: sha256 {sha[:16]}... differs from {checksums.NAME} ({want[:16]}...); "
            "the bundle was altered or damaged in transit: nothing was placed"
        )
    if m.mtime_ns:
        os.utime(dst, ns=(m.mtime_ns, m.mtime_ns))


def _check_scope(names, resolve, listing: dict, where: str) -> None:
    """A hub bundle places only its own repo's cache folder (and its stored listing), and its config file is the
    one resolve hashed; a local-folder model's bundle places nothing in the cache: a bundle must not plant
    another repo's refs, snapshots or code in the target cache."""
    if resolve.source != "hub":  # a local-folder model's bundle has model/ files, and nothing for the cache
        stray = next((n for n in names if n.startswith("hub/")), None)
        if stray is not None:
            raise errors.IntegrityError(
                f"{where}: {stray}: a cache file in the bundle of a local-folder model; the bundle is damaged or "
                "hostile: nothing was placed"
            )
        return
    folder = "models--" + resolve.repo_id.replace("/", "--")
    allowed = (f"hub/{folder}/", f"hub/.prestage/listings/{folder}/")
    for name in names:
        if name.startswith("hub/") and not name.startswith(allowed):
            raise errors.IntegrityError(
                f"{where}: {name}: not a file of {resolve.repo_id}, the bundle's model (only hub/{folder}/ may be "
                "placed in the cache); the bundle is damaged or hostile: nothing was placed"
            )
    config = f"hub/{resolve.snapshot}/{resolve.config_file}"
    if resolve.config_sha256 and listing.get(config) != resolve.config_sha256:
        raise errors.IntegrityError(
            f"{where}: {config}: {checksums.NAME} does not give the sha256 resolve recorded; "
            "the bundle was altered: nothing was placed"
        )


def _check_manifests(t: _Targets, listing: dict, meta: dict, where: str, names=()) -> list[str]:
    """The staged run's manifests: whole, chained by digest, and agreeing with the listed weight sha256s."""
    from prestage.stages.records import record_of

    found = {}
    for stage in ORDER:
        p = t.staged(f"run/{stage}.msgpack")
        if p.is_file():
            try:
                found[stage] = loads(p.read_bytes(), f"{where}: run/{stage}.msgpack")
                record_of(found[stage], f"{where}: run/{stage}.msgpack")
            except errors.BadManifestError as e:
                raise errors.IntegrityError(str(e)) from None
    for need in ("resolve", "configure", "tokenize-prep", "fetch-weights"):
        if need not in found:
            raise errors.IntegrityError(f"{where}: the bundle has no {need} manifest; it cannot be launched")
    for stage, m in found.items():
        for up, digest in m.upstream.items():
            if up not in found or found[up].digest != digest:
                raise errors.IntegrityError(
                    f"{where}: run/{up}.msgpack is not the {up} manifest {stage} was built from (edited after the "
                    "run); the bundle was altered: nothing was placed"
                )
    weights = record_of(found["fetch-weights"])
    resolve = record_of(found["resolve"])
    _check_scope(names, resolve, listing, where)
    if weights.format != "dummy":
        base = f"hub/{resolve.snapshot}" if resolve.source == "hub" else "model"
        for f in weights.files:
            name = f"{base}/{f.path}"
            if listing.get(name) != f.sha256:
                raise errors.IntegrityError(
                    f"{where}: {name}: {checksums.NAME} does not give the sha256 fetch-weights recorded; "
                    "the bundle was altered: nothing was placed"
                )
    return list(found)


def _place_link(final: Path, target: str) -> bool:
    """Point `final` at `target` (atomically); False when it already does."""
    if final.is_symlink() and os.readlink(final) == target:
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.link")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, final)
    return True


def unbundle(path, artifacts: Path, hub_cache: Path, run: str | None, model_dir, reporter, verify_key=None) -> dict:
    """Check the bundle at `path` in full (with `verify_key`, its signature first), then place it; a report
    {run, run_dir, placed, skipped, ...}."""
    b = open_verified(path, verify_key, reporter, "unbundle")
    try:
        listing = b.listing
        meta = meta_of(b)
        name, local_target = _check_target(meta, b.where, artifacts, run, model_dir)
        t = _Targets(artifacts, hub_cache, name, local_target)
        members = list(b.members())
        for m in members:
            why = problem(m, listing)
            if why:
                raise errors.IntegrityError(f"{b.where}: {why}; the bundle is damaged or hostile: nothing was placed")
        files = [m for m in members if m.kind == "file"]
        links = [m for m in members if m.kind == "link"]
        seen = {m.name for m in files} | {m.name for m in links}
        missing = sorted(set(listing) - seen)
        if missing:
            raise errors.IntegrityError(
                f"{b.where}: {missing[0]} is listed in {checksums.NAME} but missing from the bundle"
                + (f" ({len(missing)} missing)" if len(missing) > 1 else "")
                + "; copy the whole bundle again: nothing was placed"
            )
        if meta.get("source") != "local" and any(m.name.startswith("model/") for m in files):
            raise errors.IntegrityError(f"{b.where}: model/ files in a bundle of a hub model; the bundle is damaged")
        reporter.info(f"unbundle: checking {len(files)} file(s), {sum(m.size for m in files) / 1e6:.1f} MB")
        skipped: list[str] = []
        try:
            t.stage_art = _staging(t.artifacts)
            t.stage_hub = _staging(t.hub_cache) if any(m.name.startswith("hub/") for m in files) else None
            # one file copied at a time (in the kernel where it can), each hashed on the pool meanwhile
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                checks = []
                for m in files:
                    checks.append(_stage_file(b, m, t, listing, skipped, pool))
                    for c in checks:  # a mismatch found meanwhile stops the copying at once
                        if c is not None and c.done():
                            c.result()
                for c in checks:
                    if c is not None:
                        c.result()
            stages = _check_manifests(t, listing, meta, b.where, [m.name for m in files + links])
            staged = [d for d in (t.stage_art, t.stage_hub) if d is not None]
            flush.sync_filesystems(staged)  # every byte on disk before anything is renamed into place
            placed = _place(t, files, links, skipped)
            flush.sync_filesystems([t.artifacts, *([t.hub_cache] if t.stage_hub else [])])  # the renames
        except OSError as e:
            raise write_error(e, f"{t.artifacts} or {t.hub_cache}") from None
        finally:
            for d in (t.stage_art, t.stage_hub):
                if d is not None:
                    shutil.rmtree(d, ignore_errors=True)
    finally:
        b.close()
    report = {
        "run": name,
        "run_dir": str(t.run_dir),
        "hub_cache": str(t.hub_cache) if meta.get("source") != "local" else None,
        "model_dir": str(local_target) if local_target else None,
        "stages": stages,
        "placed": placed,
        "skipped": sorted(skipped),
        "bytes": sum(m.size for m in files if m.name not in skipped),
    }
    reporter.info(
        f"unbundle: placed run {name} in {t.run_dir} ({len(placed)} file(s)"
        + (f", {len(skipped)} blob(s) already in the cache" if skipped else "")
        + ")"
        + (f"; model files in {t.hub_cache}" if report["hub_cache"] else f"; model folder {local_target}")
    )
    return report


def write_error(e: OSError, where: str) -> errors.PrestageError:
    """A failed write as one line: no space left is `resource`, anything else (permissions) `usage`."""
    if e.errno == errno.ENOSPC:
        return errors.ResourceError(f"no space left writing into {where}; free disk space (nothing was placed)")
    return errors.UsageError(
        f"{e.filename or where}: {e.strerror}; check that {where} is writable and the sources readable"
    )


def _place(t: _Targets, files, links, skipped: list) -> list[str]:
    """Rename the staged files into place: cache first, the run folder last (one rename)."""
    placed = []
    for m in files:
        if m.name.startswith("hub/") and m.name not in skipped:
            final = t.final(m.name)
            if "/refs/" in m.name and final.exists():
                if final.read_bytes().strip() != t.staged(m.name).read_bytes().strip():
                    skipped.append(m.name)  # the target cache's ref points elsewhere: leave it
                    continue
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(t.staged(m.name), final)
            placed.append(m.name)
    for m in links:
        if m.name.startswith("hub/"):
            _place_link(t.final(m.name), m.link)
            placed.append(m.name)
    if t.model_dir is not None:
        t.model_dir.parent.mkdir(parents=True, exist_ok=True)
        if t.model_dir.is_dir():
            t.model_dir.rmdir()  # checked empty before anything was staged
        os.rename(t.staged("model"), t.model_dir)
        placed += [m.name for m in files if m.name.startswith("model/")]
    run_staged = t.staged("run")
    run_staged.mkdir(exist_ok=True)
    if t.run_dir.is_dir():
        t.run_dir.rmdir()  # checked empty before anything was staged
    t.run_dir.parent.mkdir(parents=True, exist_ok=True)
    os.rename(run_staged, t.run_dir)
    placed += [m.name for m in files if m.name.startswith("run/")]
    return placed
