"""The Hugging Face cache, read and written by its documented layout (refs/, snapshots/, blobs/, .locks/) with
no import of huggingface_hub, so a cached path of a stage stays fast and makes no network call. Names from
outside are checked before they touch a path (stages/names.py): the revision of a refs/ file, the ETag that
names a blob, every repo file name. `verify_cached(...)`: a cached file checked against the listing's sha256
(LFS) or git blob id (other files) before it is used; a mismatch deletes it (integrity)."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

from prestage.stages import errors, names
from prestage.stages.hub.settings import SHA_RE


def repo_folder(cache_dir: Path, repo_id: str) -> Path:
    return Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def _ref_file(cache_dir: Path, repo_id: str, revision: str) -> Path:
    """The cache's refs/<revision> file, the revision checked by git's ref-name rules and the path kept
    inside refs/ (a branch named "/tmp/x" or "../x" never names a file elsewhere)."""
    from prestage.stages.paths import inside

    names.revision(revision)
    refs = repo_folder(cache_dir, repo_id) / "refs"
    return inside(
        refs, revision, f"--revision {revision!r}", error=errors.UsageError, fix="pass a plain branch or tag name"
    )


def read_ref(cache_dir: Path, repo_id: str, revision: str) -> str | None:
    """The commit a revision points to in the cache (a 40-hex revision is its own commit)."""
    if SHA_RE.match(revision):
        return revision
    try:
        sha = _ref_file(cache_dir, repo_id, revision).read_text().strip()
    except OSError:
        return None
    return sha if SHA_RE.match(sha) else None


def ref_path(cache_dir: Path, repo_id: str, revision: str) -> Path:
    """refs/<revision>, checked (see _ref_file)."""
    return _ref_file(cache_dir, repo_id, revision)


def write_ref(cache_dir: Path, repo_id: str, revision: str, commit: str, *, asked: bool = False) -> None:
    """Point refs/<revision> at `commit`; the file is rewritten only when it changes (its mtime is when the
    cache learnt the commit), and `asked` (the hub was just asked) sets its mtime to now."""
    if SHA_RE.match(revision) or revision == commit:
        return
    if not SHA_RE.match(commit):
        raise errors.IntegrityError(f"{repo_id}@{revision}: the hub gave commit {commit[:80]!r}, not a 40-hex sha")
    ref = ref_path(cache_dir, repo_id, revision)
    if read_ref(cache_dir, repo_id, revision) != commit:
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, ref)
    elif asked:
        os.utime(ref)


def ref_time(cache_dir: Path, repo_id: str, revision: str) -> float | None:
    """When refs/<revision> was last written or confirmed by the hub (its mtime), or None."""
    try:
        return ref_path(cache_dir, repo_id, revision).stat().st_mtime
    except OSError:
        return None


def snapshot_rel(repo_id: str, commit: str) -> str:
    """The snapshot folder relative to the cache root, as manifests record it."""
    return f"models--{repo_id.replace('/', '--')}/snapshots/{commit}"


def cached_file(cache_dir: Path, repo_id: str, commit: str, path: str) -> Path | None:
    names.repo_path(path, f"{repo_id}@{commit[:12]}", errors.BadManifestError)
    p = Path(cache_dir) / snapshot_rel(repo_id, commit) / path
    return p if p.is_file() else None


def git_blob_id(path: Path) -> str:
    """Git's object id of a file's bytes (sha1 of `blob <size>\\0` + bytes): the hub's id of a non-LFS file."""
    import hashlib

    h = hashlib.sha1()
    with open(path, "rb") as f:
        h.update(b"blob %d\0" % os.fstat(f.fileno()).st_size)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def content_id(path: Path, kind: str) -> str:
    """The file's sha256 (kind "sha256") or git blob id (kind "git")."""
    if kind == "git":
        return git_blob_id(path)
    from prestage.stages.digest import sha256_hex

    return sha256_hex(path)


def expected_id(entry: dict | None, blob_name: str | None = None) -> tuple[str, str] | None:
    """(kind, id) a cached file must match: the listing's LFS sha256, else its git blob id, else the blob's
    own name in the cache (blobs/<etag>: a sha256 or a git blob id); None when nothing says."""
    entry = entry or {}
    if entry.get("sha256"):
        return "sha256", entry["sha256"]
    if entry.get("blob_id") and not entry.get("lfs"):
        return "git", entry["blob_id"]
    if blob_name and names.SHA256_RE.match(blob_name):
        return "sha256", blob_name
    if blob_name and names.GIT_OID_RE.match(blob_name):
        return "git", blob_name
    return None


def remove_cached(snapshot: Path, rel: str) -> None:
    """Delete a cached file: its snapshot symlink and the blob it points to."""
    link = Path(snapshot) / rel
    try:
        target = link.resolve() if link.is_symlink() else None
    except OSError:
        target = None
    for p in (link, target):
        if p is not None:
            try:
                p.unlink()
            except FileNotFoundError:
                pass


def verify_cached(cache_dir: Path, repo_id: str, commit: str, rel: str, entry: dict | None = None) -> Path | None:
    """The cached snapshot file `rel` after checking its bytes against the listing `entry` ({size, sha256,
    blob_id, lfs}; else against the blob's own name); None when it is not cached. A mismatch deletes the
    cached copy (blob and snapshot link), so the next run downloads it again, and raises IntegrityError."""
    path = cached_file(cache_dir, repo_id, commit, rel)
    if path is None:
        return None
    snap = Path(cache_dir) / snapshot_rel(repo_id, commit)
    try:
        blob_name = path.resolve().name if path.is_symlink() else None
    except OSError:
        blob_name = None
    want = expected_id(entry, blob_name)
    size = (entry or {}).get("size")
    bad = None
    if size is not None and path.stat().st_size != size:
        bad = f"has {path.stat().st_size} bytes, the hub listed {size}"
    elif want is not None:
        got = content_id(path, want[0])
        if got != want[1]:
            label = "sha256" if want[0] == "sha256" else "git blob id"
            bad = f"{label} {got} differs from the hub's {want[1]}"
    if bad:
        remove_cached(snap, rel)
        raise errors.IntegrityError(
            f"{repo_id}@{commit[:12]} ({rel}): the cached copy {bad}; it was deleted from the cache {cache_dir}: "
            "re-run to download it again"
        )
    return path


# ---- errors -----------------------------------------------------------------------------------------


@contextmanager
def blob_lock(cache_dir: Path, repo_id: str, etag: str):
    """The blob's lock across processes, where huggingface_hub keeps its own (<cache>/.locks/models--org--name/
    <etag>.lock): two processes never append to one partial file, nor one to a blob the other just finished."""
    from filelock import FileLock

    path = Path(cache_dir) / ".locks" / repo_folder(Path(""), repo_id).name / f"{etag}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield
