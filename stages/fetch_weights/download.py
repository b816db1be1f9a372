"""Getting the selected files of a hub repo into the Hugging Face cache, once, resumably, with progress.

- `repo_lock`: a filelock.FileLock named as vLLM names its weight lock (`<download_dir or tmp>/<sha256(name)>
  <name>.lock`, name = repo id with "/" → "-", mode 0o666), so two prestage processes, or prestage and
  `vllm serve` on the same download dir, download a model once: the second waits, then finds it cached.
- `missing_files`: which files the snapshot lacks (a cached file with the wrong size counts as missing
  and is removed); offline, anything missing is an OfflineMissError naming the files.
- `check_disk`: the bytes still to download (minus what `.incomplete` partial blobs already hold) against
  the free space of the cache's filesystem, before any download: ResourceError with both numbers.
- `fetch_parallel`: every missing file at the pinned commit on a thread pool (huggingface_hub's metadata
  call and `http_get`, into the library's cache layout), each file handed to
  `post(path)` (hashing, header parsing) as soon as it is there, one aggregate tqdm bar on stderr (bytes,
  rate, ETA). Interrupted downloads resume, even after a kill: the partial file stays as
  `blobs/<etag>.incomplete` and the next run asks only for the rest (Range); finished files are never
  fetched again.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from prestage.stages import errors, hub


def lock_file(download_dir: str | Path | None, repo_id: str) -> Path:
    """vLLM's `get_lock` path for a model: shared with `vllm serve` on the same download dir."""
    name = repo_id.replace("/", "-")
    base = Path(download_dir) if download_dir else Path(tempfile.gettempdir())
    return base / (hashlib.sha256(name.encode()).hexdigest() + name + ".lock")


@contextmanager
def repo_lock(download_dir, repo_id: str, reporter=None):
    from filelock import FileLock, Timeout

    path = lock_file(download_dir, repo_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), mode=0o666)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if reporter is not None:
            reporter.info(f"waiting for another process fetching {repo_id} (lock {path})")
        lock.acquire()
    try:
        yield path
    finally:
        lock.release()


def snapshot_dir(s: hub.HubSettings, repo_id: str, commit: str) -> Path:
    return s.cache_dir / hub.snapshot_rel(repo_id, commit)


def remove_cached(snapshot: Path, rel: str) -> None:
    """Delete a cached file: its snapshot symlink and the blob it points to."""
    link = snapshot / rel
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


def missing_files(s: hub.HubSettings, repo_id: str, commit: str, files: list[dict]) -> list[dict]:
    """The files not (completely) in the snapshot; a cached file of the wrong size is removed."""
    snap = snapshot_dir(s, repo_id, commit)
    out = []
    for f in files:
        p = snap / f["path"]
        if p.is_file():
            if f.get("size") is None or p.stat().st_size == f["size"]:
                continue
            remove_cached(snap, f["path"])
        out.append(f)
    return out


def offline_check(s: hub.HubSettings, repo_id: str, commit: str, missing: list[dict]) -> None:
    if missing:
        names = ", ".join(f["path"] for f in missing[:10]) + (
            f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
        )
        raise errors.OfflineMissError(
            f"{repo_id}@{commit[:12]}: offline mode is on and {len(missing)} weight "
            f"file(s) are not in the cache {s.cache_dir}: {names}; run once online "
            "(unset HF_HUB_OFFLINE / drop --offline) to fetch them"
        )


def partial_bytes(s: hub.HubSettings, repo_id: str, f: dict) -> int:
    if not f.get("sha256"):
        return 0
    p = hub.repo_folder(s.cache_dir, repo_id) / "blobs" / (f["sha256"] + ".incomplete")
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _free_bytes(path: Path) -> int:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_disk(s: hub.HubSettings, repo_id: str, missing: list[dict]) -> int:
    """Bytes still to download; ResourceError when the cache's filesystem has less free space."""
    need = sum(max(0, (f.get("size") or 0) - partial_bytes(s, repo_id, f)) for f in missing)
    free = _free_bytes(s.cache_dir)
    if need > free:
        raise errors.ResourceError(
            f"{repo_id}: the weights need {_gb(need)} more in {s.cache_dir} but only "
            f"{_gb(free)} is free; free space there or pass --download-dir on a larger disk"
        )
    return need


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB ({n} bytes)"


def _aggregate_tqdm(bar):
    """A tqdm stand-in for huggingface_hub's `http_get` that adds each file's progress to one shared bar."""
    lock = threading.Lock()

    class _Part:
        def __init__(self, *args, **kwargs):
            pass  # resumed bytes (`initial`) were already left out of the bar's total

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def close(self):
            pass

        def update(self, n=1):
            if bar is not None and n:
                with lock:
                    bar.update(n)

        def set_postfix_str(self, *a, **k):
            pass

        def set_description(self, *a, **k):
            pass

        def refresh(self, *a, **k):
            pass

    return _Part


def fetch_parallel(
    s: hub.HubSettings,
    repo_id: str,
    commit: str,
    files: list[dict],
    *,
    to_fetch: set,
    post,
    max_workers: int = 8,
    progress: bool = True,
    need_bytes: int = 0,
) -> dict:
    """Download `to_fetch` paths (others are cached), calling post(rel, abs_path) per file; {rel: post()}."""
    snap = snapshot_dir(s, repo_id, commit)
    bar = None
    if progress and to_fetch:
        from tqdm import tqdm

        bar = tqdm(
            total=need_bytes or None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            desc=f"fetch {repo_id}",
            dynamic_ncols=True,
            leave=True,
        )
    part = _aggregate_tqdm(bar)

    def one(f: dict):
        rel = f["path"]
        if rel in to_fetch:
            return rel, post(rel, Path(_download(s, repo_id, commit, rel, part)))
        try:
            return rel, post(rel, snap / rel)
        except errors.IntegrityError:
            if s.offline:
                raise
            # a cached copy whose bytes went bad (post deleted it): download it once more
            return rel, post(rel, Path(_download(s, repo_id, commit, rel, part)))

    try:
        with ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="fetch") as pool:
            futures = [pool.submit(one, f) for f in files]
            results = {}
            first_error = None
            for fut in futures:
                try:
                    rel, value = fut.result()
                    results[rel] = value
                except KeyboardInterrupt:  # Ctrl-C: start nothing more; a half-written blob resumes next time
                    for other in futures:
                        other.cancel()
                    raise
                except BaseException as e:  # a failed file: let the others finish, then report the first
                    first_error = first_error or e
            if first_error is not None:
                raise first_error
            return results
    finally:
        if bar is not None:
            bar.close()


_ETAG_LOCKS: dict = {}
_ETAG_GUARD = threading.Lock()


def _download(s: hub.HubSettings, repo_id: str, commit: str, rel: str, part) -> str:
    """One file into the cache, resuming a partial `blobs/<etag>.incomplete` left by an earlier process.

    huggingface_hub 2.x downloads to a process-unique temp name and never resumes across processes, so
    the partial file is kept here under a stable name and continued with huggingface_hub's own `http_get`
    (Range request, size check, retries). The cache layout is the library's: `blobs/<etag>` plus a
    relative symlink `snapshots/<commit>/<path>`, so huggingface_hub and vLLM read it as their own.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(repo_id, rel, revision=commit, endpoint=s.endpoint)
    try:
        meta = hub.with_retries(lambda: get_hf_file_metadata(url, token=s.token or None))
        if not meta.etag:
            raise errors.NetworkError(
                f"{repo_id}@{commit[:12]} ({rel}): the hub sent no ETag for the file; "
                "check HF_ENDPOINT points at a Hugging Face hub"
            )
        blobs = hub.repo_folder(s.cache_dir, repo_id) / "blobs"
        blob = blobs / meta.etag
        with _ETAG_GUARD:
            guard = _ETAG_LOCKS.setdefault(str(blob), threading.Lock())
        with guard:
            if not blob.exists():
                blobs.mkdir(parents=True, exist_ok=True)
                partial = blobs / (meta.etag + ".incomplete")
                headers = build_hf_headers(token=s.token or None)
                if urlsplit(meta.location).netloc != urlsplit(url).netloc:
                    headers.pop("authorization", None)  # never send the token to another host
                with open(partial, "ab") as fh:
                    resume = fh.tell()
                    if meta.size is not None and resume > meta.size:
                        fh.truncate(0)
                        resume = 0
                    hub.with_retries(
                        lambda: http_get(
                            meta.location,
                            fh,
                            resume_size=fh.tell(),
                            headers=headers,
                            expected_size=meta.size,
                            displayed_filename=rel,
                            tqdm_class=part,
                        )
                    )
                os.chmod(partial, 0o644)
                os.replace(partial, blob)
        link = snapshot_dir(s, repo_id, commit) / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.{os.getpid()}.{threading.get_ident()}.link")
        os.symlink(os.path.relpath(blob, link.parent), tmp)
        os.replace(tmp, link)
        return str(link)
    except errors.PrestageError:
        raise
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise errors.ResourceError(
                f"{repo_id} ({rel}): the disk holding {s.cache_dir} is full; free space "
                "or pass --download-dir on a larger disk, then re-run to resume"
            ) from None
        if "Consistency check failed" in str(e):
            raise errors.NetworkError(
                f"{repo_id}@{commit[:12]} ({rel}): the transfer ended early ({e}); re-run to resume it"
            ) from None
        if not hasattr(e, "response") and not isinstance(e, ConnectionError):
            raise
        raise hub.translate(e, repo_id=repo_id, revision=commit, s=s, what=rel) from None
    except Exception as e:
        raise hub.translate(e, repo_id=repo_id, revision=commit, s=s, what=rel) from None


def download_one(s: hub.HubSettings, repo_id: str, commit: str, rel: str) -> Path:
    """One small file (an index JSON) at the pinned commit, from the cache when it is there."""
    cached = hub.cached_file(s.cache_dir, repo_id, commit, rel)
    if cached is not None:
        return cached
    if s.offline:
        offline_check(s, repo_id, commit, [{"path": rel}])
    return Path(_download(s, repo_id, commit, rel, _aggregate_tqdm(None)))
