"""Getting the selected files of a hub repo into the Hugging Face cache, once, resumably, with progress.

- `repo_lock`: a filelock.FileLock named as vLLM names its weight lock (`<download_dir or tmp>/<sha256(name)>
  <name>.lock`, name = repo id with "/" → "-", mode 0o666), so two prestage processes, or prestage and
  `vllm serve` on the same download dir, download a model once: the second waits, then finds it cached.
- `missing_files`: which files the snapshot lacks (a cached file with the wrong size counts as missing
  and is removed); a file whose blob is already in the cache (the same LFS sha256 under another commit)
  is linked into the snapshot, not downloaded nor announced. Offline, anything missing is an
  OfflineMissError naming the files.
- `check_disk`: the bytes still to download (minus what `.incomplete` partial blobs already hold) against
  the free space of the cache's filesystem, before any download: ResourceError with both numbers.
- `fetch_parallel`: every missing file at the pinned commit on a thread pool (`hub.HubClient.download`,
  into the library's cache layout), each file handed to `post(path)` (hashing, header parsing) as soon as
  it is there, one aggregate tqdm bar on stderr (bytes, rate, ETA in decimal MB like every log line,
  moved by every network chunk). Interrupted downloads resume, even
  after a kill: the partial file stays as `blobs/<etag>.incomplete` and the next run asks only for the
  rest (Range); finished files are never fetched again. Ctrl-C stops within about a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

from prestage.stages import errors, hub, units
from prestage.stages.units import size_text


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
    hub.remove_cached(snapshot, rel)


def missing_files(s: hub.HubSettings, repo_id: str, commit: str, files: list[dict]) -> list[dict]:
    """The files not (completely) in the snapshot; a cached file of the wrong size is removed, and one whose
    blob the cache already holds (same LFS sha256 and size, e.g. from an earlier commit) is linked in."""
    snap = snapshot_dir(s, repo_id, commit)
    out = []
    for f in files:
        p = snap / f["path"]
        if p.is_file():
            if f.get("size") is None or p.stat().st_size == f["size"]:
                continue
            remove_cached(snap, f["path"])
        if link_cached_blob(s, repo_id, snap, f):
            continue
        out.append(f)
    return out


def link_cached_blob(s: hub.HubSettings, repo_id: str, snap: Path, f: dict) -> bool:
    """Point snapshots/<commit>/<path> at blobs/<sha256> when that blob is there whole (the library's layout:
    an LFS file's blob is named by its sha256); whether it was linked. The bytes are hashed afterwards."""
    sha, size = f.get("sha256"), f.get("size")
    if not sha or size is None:
        return False
    blob = hub.repo_folder(s.cache_dir, repo_id) / "blobs" / sha
    try:
        if not blob.is_file() or blob.stat().st_size != size:
            return False
        link = snap / f["path"]
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.{os.getpid()}.{threading.get_ident()}.link")
        os.symlink(os.path.relpath(blob, link.parent), tmp)
        os.replace(tmp, link)
    except OSError:
        return False
    return True


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
            f"{repo_id}: the weights need {_bytes(need)} more in {s.cache_dir} but only "
            f"{_bytes(free)} is free; free space there or pass --download-dir on a larger disk"
        )
    return need


def _bytes(n: int) -> str:
    return f"{size_text(n)} ({n} bytes)"


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
    reporter=None,
) -> dict:
    """Download `to_fetch` paths (others are cached), calling post(rel, abs_path) per file; {rel: post()}.

    Ctrl-C: the workers stop between chunks (well within a second), their partial `.incomplete` files stay
    for the next run to resume with a Range request, and KeyboardInterrupt goes on to the CLI (exit 130,
    no manifest written); a second Ctrl-C while the workers wind down exits at once.
    """
    snap = snapshot_dir(s, repo_id, commit)
    client = hub.HubClient(s, reporter)
    bar = None
    if progress and to_fetch:
        from tqdm import tqdm

        bar = tqdm(
            total=need_bytes or None,
            unit="B",
            unit_scale=True,
            unit_divisor=units.DIVISOR,
            bar_format=units.BAR_FORMAT if need_bytes else units.BAR_FORMAT_NO_TOTAL,
            file=sys.stderr,
            desc=f"fetch {repo_id}",
            dynamic_ncols=True,
            leave=True,
        )
    lock = threading.Lock()

    def tick(n: int) -> None:
        if bar is not None and n:
            with lock:
                bar.update(n)

    def get(rel: str) -> Path:
        return client.download(repo_id, rel, commit, progress=tick)

    def one(f: dict):
        rel = f["path"]
        if rel in to_fetch:
            return rel, post(rel, get(rel))
        try:
            return rel, post(rel, snap / rel)
        except errors.IntegrityError:
            if s.offline:
                raise
            # a cached copy whose bytes went bad (post deleted it): download it once more
            return rel, post(rel, get(rel))

    pool = ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="fetch")
    futures = [pool.submit(one, f) for f in files]
    try:
        results = {}
        first_error = None
        for fut in futures:
            try:
                rel, value = fut.result()
                results[rel] = value
            except hub.HubStopped:
                continue
            except Exception as e:  # a failed file: let the others finish, then report the first
                first_error = first_error or e
        if first_error is not None:
            raise first_error
        pool.shutdown(wait=True)
        return results
    except KeyboardInterrupt:
        # Ctrl-C: start nothing more, stop the running transfers between chunks, keep their partial files
        client.stop.set()
        _exit_on_next_interrupt()
        pool.shutdown(wait=False, cancel_futures=True)
        wait(futures, timeout=1.0)  # running transfers close their partial files at the next chunk
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if bar is not None:
            bar.close()


def _exit_on_next_interrupt() -> None:
    """A second Ctrl-C ends the process at once (exit 130), without waiting for worker threads."""
    if threading.current_thread() is not threading.main_thread():
        return

    def now(signum, frame):
        os.write(2, b"prestage: interrupted\n")
        os._exit(130)

    signal.signal(signal.SIGINT, now)


def download_one(s: hub.HubSettings, repo_id: str, commit: str, rel: str, reporter=None, entry=None) -> Path:
    """One small file (an index JSON) at the pinned commit, from the cache when it is there; either way its
    bytes are checked against the listing `entry` first (a corrupt cached copy is deleted: IntegrityError)."""
    cached = hub.verify_cached(s.cache_dir, repo_id, commit, rel, entry)
    if cached is not None:
        return cached
    if s.offline:
        offline_check(s, repo_id, commit, [{"path": rel}])
    return hub.HubClient(s, reporter).download(repo_id, rel, commit, expect=entry)
