"""`HubClient(s)`: every network call prestage makes (repo info, one file into the cache at a commit, resumable
and stoppable, the non-weight snapshot), each with connect/read timeouts, bounded retries that honour
Retry-After, the token given or none (never the library's own lookup), huggingface_hub's log chatter folded
into one reporter line per retry, and errors translated. See `STALL_BOUND_S` (settings.py). A download is
checked against its ETag and the listing before it becomes a blob, under a per-blob file lock shared with
huggingface_hub (two processes never write one partial file)."""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from prestage.stages import errors, names
from prestage.stages.hub.cache import blob_lock, content_id, expected_id, repo_folder, snapshot_rel, verify_cached
from prestage.stages.hub.failures import (
    HubStopped,
    is_connection_error,
    is_timeout,
    is_transient,
    retry_after_seconds,
    status_of,
    translate,
)
from prestage.stages.hub.settings import (
    ATTEMPTS,
    BACKOFF_S,
    MIN_RATE_ENV,
    RETRY_AFTER_CAP_S,
    TIMEOUT_ENV,
    HubSettings,
    call_bound,
    min_rate_from_env,
    prepare_env,
    timeouts_from_env,
)

_ETAG_LOCKS: dict = {}  # threads of one process
_ETAG_GUARD = threading.Lock()


class _Stderr:
    def info(self, msg: str) -> None:
        print(f"prestage: {msg}", file=sys.stderr, flush=True)


_QUIET_LOCK = threading.Lock()
_QUIET_DEPTH = 0
_QUIET_SAVED: int | None = None


@contextmanager
def _library_quiet():
    """huggingface_hub's logger says nothing below ERROR while a call runs (prestage reports one line per
    retry itself); the level is put back when the last concurrent call ends."""
    global _QUIET_DEPTH, _QUIET_SAVED
    log = logging.getLogger("huggingface_hub")
    with _QUIET_LOCK:
        if _QUIET_DEPTH == 0:
            _QUIET_SAVED = log.level
            log.setLevel(logging.ERROR)
        _QUIET_DEPTH += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET_DEPTH -= 1
            if _QUIET_DEPTH == 0:
                log.setLevel(_QUIET_SAVED or logging.NOTSET)


class HubClient:
    """Every hub call prestage makes, built from HubSettings (see the module docstring).

    `reporter` gets one `info` line per retry; `stop` (a threading.Event) ends running transfers between
    chunks with HubStopped. Thread-safe: fetch-weights shares one client between its workers.
    """

    def __init__(self, s: HubSettings, reporter=None, stop: threading.Event | None = None):
        self.s = s
        self.reporter = reporter if reporter is not None else _Stderr()
        self.stop = stop if stop is not None else threading.Event()
        self.connect_s, self.read_s = timeouts_from_env()
        self.bound_s = call_bound(self.connect_s, self.read_s)
        # The token given to prestage, or False: huggingface_hub must never look one up on its own.
        self.token: str | bool = s.token or False
        self._local = threading.local()
        prepare_env(s)

    # ---- the retry loop ------------------------------------------------------------------------
    def _timeout(self):
        """Connect/read timeouts for the next request, never past the running call's deadline."""
        import httpx2

        left = getattr(self._local, "deadline", None)
        left = None if left is None else max(0.05, left - time.monotonic())
        c = self.connect_s if left is None else min(self.connect_s, left)
        r = self.read_s if left is None else min(self.read_s, left)
        return httpx2.Timeout(connect=c, read=r, write=r, pool=c)

    def _progress(self) -> None:
        """A transfer received bytes: the running call starts over its tries and its deadline."""
        self._local.progressed = True

    def call(self, fn, *, repo_id: str, revision: str | None, what: str = ""):
        """fn() with the retry policy; a failure comes out as a PrestageError (HubStopped passes through)."""
        where = f"{repo_id}@{revision or 'main'}" + (f" ({what})" if what else "")
        deadline = time.monotonic() + self.bound_s
        attempt = 0
        while True:
            attempt += 1
            self._local.deadline, self._local.progressed = deadline, False
            try:
                with _library_quiet():
                    return fn()
            except (HubStopped, errors.PrestageError):
                raise
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise errors.ResourceError(
                        f"{where}: the disk holding {self.s.cache_dir} is full; free space or pass "
                        "--download-dir on a larger disk, then re-run to resume"
                    ) from None
                if not is_connection_error(e) and not hasattr(e, "response"):
                    raise
                last = e
            except Exception as e:
                last = e
            finally:
                self._local.deadline = None
            if self._local.progressed:  # bytes arrived before the failure: a fresh set of tries
                attempt, deadline = 1, time.monotonic() + self.bound_s
            if not is_transient(last):
                raise translate(last, repo_id=repo_id, revision=revision, s=self.s, what=what) from last
            asked = retry_after_seconds(getattr(getattr(last, "response", None), "headers", None))
            if asked is not None and asked > RETRY_AFTER_CAP_S:
                raise errors.NetworkError(
                    f"{where}: hub {self.s.endpoint} answered HTTP {status_of(last)} and asks to retry after "
                    f"{asked:.0f} s, more than the {RETRY_AFTER_CAP_S:.0f} s prestage waits; retry later"
                ) from last
            wait = asked if asked is not None else BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1]
            if attempt >= ATTEMPTS or (asked is None and time.monotonic() + wait > deadline):
                raise self._give_up(last, where, attempt, repo_id, revision, what) from last
            if asked is not None:
                deadline += wait  # a wait the hub asked for does not eat the stall budget
            why = f"HTTP {status_of(last)}" if status_of(last) else type(last).__name__
            self.reporter.info(
                f"hub: {why} from {self.s.endpoint} for {where}; retrying in {wait:.1f} s "
                f"(try {attempt + 1} of {ATTEMPTS})"
            )
            if self.stop.wait(wait):
                raise HubStopped(where)

    def _give_up(self, e, where, attempts, repo_id, revision, what) -> errors.PrestageError:
        if is_timeout(e):
            return errors.NetworkError(
                f"{where}: hub {self.s.endpoint} gave no answer within {self.read_s:g} s "
                f"({attempts} tries, {type(e).__name__}); check the network or HF_ENDPOINT, or raise "
                f"{TIMEOUT_ENV} (connect,read seconds)"
            )
        return translate(e, repo_id=repo_id, revision=revision, s=self.s, what=what)

    # ---- the calls -----------------------------------------------------------------------------
    def repo_info(self, repo_id: str, revision: str, *, files_metadata: bool = False, what: str = ""):
        """huggingface_hub's ModelInfo of repo@revision (sha, siblings; sizes and LFS sha256 on request)."""
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.s.endpoint, token=self.token)
        return self.call(
            lambda: api.model_info(
                repo_id, revision=revision, files_metadata=files_metadata, timeout=self._timeout(), token=self.token
            ),
            repo_id=repo_id,
            revision=revision,
            what=what,
        )

    def file_metadata(self, repo_id: str, path: str, commit: str, revision: str | None = None):
        """huggingface_hub's HfFileMetadata (etag, size, location) of one file at a commit."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(repo_id, path, revision=commit, endpoint=self.s.endpoint)
        meta = self.call(
            lambda: get_hf_file_metadata(url, token=self.token, timeout=self._timeout(), endpoint=self.s.endpoint),
            repo_id=repo_id,
            revision=revision or commit,
            what=path,
        )
        if not meta.etag:
            raise errors.NetworkError(
                f"{repo_id}@{commit[:12]} ({path}): the hub sent no ETag for the file; "
                "check HF_ENDPOINT points at a Hugging Face hub"
            )
        return url, meta

    def download(
        self,
        repo_id: str,
        path: str,
        commit: str,
        *,
        revision: str | None = None,
        progress=None,
        expect: dict | None = None,
    ) -> Path:
        """One file of repo@commit into the cache (blobs/<etag> + snapshots/<commit>/<path> symlink, the
        library's layout); the snapshot path. Resumable: the partial file stays as blobs/<etag>.incomplete
        (also after a kill or a Ctrl-C) and the next try or run asks only for the rest (Range).
        `progress(n)` gets every chunk's byte count (negative when a hub ignored the Range); `revision` is
        the name messages use for the commit (the branch or tag asked for).

        Nothing the hub says becomes a path unchecked: the file name must be a relative path inside the repo,
        the ETag a sha256 or a git blob id, the redirect an http(s) URL (the token goes only to the hub's own
        host). The bytes must match the ETag and, when given, `expect` (the listing's {size, sha256, blob_id,
        lfs}) before they become the blob; a mismatch deletes the partial file and raises IntegrityError."""
        from urllib.parse import urljoin, urlsplit

        from huggingface_hub.utils import build_hf_headers

        where = f"{repo_id}@{(revision or commit)[:40]} ({path})"
        names.repo_path(path, where)
        url, meta = self.file_metadata(repo_id, path, commit, revision)
        etag = names.etag(meta.etag, where)
        want = expected_id(expect)
        if want is not None and want[1] != etag and len(want[1]) == len(etag):
            raise errors.IntegrityError(
                f"{where}: the hub's ETag {etag} differs from its listing's {want[1]}; nothing was written; "
                "re-run resolve (the branch may have moved) or check HF_ENDPOINT"
            )
        location = urljoin(url, meta.location or url)
        if urlsplit(location).scheme not in ("http", "https"):
            raise errors.IntegrityError(
                f"{where}: the hub redirected to {location[:120]!r}, not an http(s) URL; nothing was written; "
                "check HF_ENDPOINT"
            )
        blobs = repo_folder(self.s.cache_dir, repo_id) / "blobs"
        blob = blobs / etag
        with _ETAG_GUARD:
            guard = _ETAG_LOCKS.setdefault(str(blob), threading.Lock())
        with guard, blob_lock(self.s.cache_dir, repo_id, etag):
            if not blob.exists():
                blobs.mkdir(parents=True, exist_ok=True)
                partial = blobs / (etag + ".incomplete")
                headers = build_hf_headers(token=self.token)
                if urlsplit(location).netloc != urlsplit(url).netloc:
                    headers.pop("authorization", None)  # never send the token to another host
                headers["Accept-Encoding"] = "identity"
                try:
                    with open(partial, "ab") as fh:
                        if meta.size is not None and fh.tell() > meta.size:
                            fh.truncate(0)
                        self.call(
                            lambda: self._transfer(location, fh, meta.size, headers, progress, where),
                            repo_id=repo_id,
                            revision=revision or commit,
                            what=path,
                        )
                except BaseException:
                    if partial.exists() and partial.stat().st_size == 0:
                        partial.unlink()  # stopped before the first byte: nothing to resume
                    raise
                self._check_bytes(partial, etag, want, expect, where)
                os.chmod(partial, 0o644)
                os.replace(partial, blob)
        link = Path(self.s.cache_dir) / snapshot_rel(repo_id, commit) / path
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.{os.getpid()}.{threading.get_ident()}.link")
        os.symlink(os.path.relpath(blob, link.parent), tmp)
        os.replace(tmp, link)
        return link

    @staticmethod
    def _check_bytes(partial: Path, etag: str, want, expect: dict | None, where: str) -> None:
        """The downloaded bytes against the ETag (their name in the cache) and the listing; a mismatch
        deletes them (the next try downloads from scratch) and raises IntegrityError."""
        checks = [("sha256" if len(etag) == 64 else "git", etag, "ETag")]
        if want is not None and want[1] != etag:
            checks.append((want[0], want[1], "listing"))
        size = (expect or {}).get("size")
        bad = None
        if size is not None and partial.stat().st_size != size:
            bad = f"{partial.stat().st_size} bytes arrived, the listing says {size}"
        else:
            for kind, value, source in checks:
                got = content_id(partial, kind)
                if got != value:
                    label = "sha256" if kind == "sha256" else "git blob id"
                    bad = f"the bytes' {label} {got} differs from the hub's {source} {value}"
                    break
        if bad:
            partial.unlink(missing_ok=True)
            raise errors.IntegrityError(
                f"{where}: {bad}; the corrupt download was deleted and nothing was cached: re-run to download "
                "it again, or check HF_ENDPOINT"
            )

    def _transfer(self, url: str, fh, size: int | None, headers: dict, progress, where: str = "") -> None:
        """GET the rest of a file (Range from what `fh` holds) onto its end, chunk by chunk."""
        from huggingface_hub import get_session
        from huggingface_hub.utils import hf_raise_for_status

        start = fh.tell()
        if size is not None and start == size:
            return
        rate, grace = min_rate_from_env()
        began = time.monotonic()
        deadline = began + grace + (size - start if size is not None else 0) / rate
        h = dict(headers)
        if start:
            h["Range"] = f"bytes={start}-"
        with get_session().stream("GET", url, headers=h, timeout=self._timeout(), follow_redirects=True) as r:
            if r.status_code >= 400:
                r.read()
                hf_raise_for_status(r)
            if start and r.status_code == 200:  # the hub ignored the Range: start over
                fh.seek(0)
                fh.truncate(0)
                if progress is not None:
                    progress(-start)
            for chunk in r.iter_bytes():
                if self.stop.is_set():
                    raise HubStopped(url)
                if chunk:
                    fh.write(chunk)
                    self._progress()
                    if progress is not None:
                        progress(len(chunk))
                if time.monotonic() > deadline:  # a trickle: the partial file stays for a later resume
                    got = fh.tell() - start
                    raise errors.NetworkError(
                        f"{where or url[:120]}: {got} of {size - start if size else '?'} bytes in "
                        f"{time.monotonic() - began:.0f} s, below the minimum of {rate:.0f} B/s; check the network "
                        f"(a re-run resumes), or lower {MIN_RATE_ENV}"
                    )
        fh.flush()
        if size is not None and fh.tell() != size:
            raise ConnectionError(f"the transfer ended at {fh.tell()} of {size} bytes")  # transient: resumed

    def snapshot(self, repo_id: str, commit: str, paths, *, ignore_patterns=(), what: str = "") -> Path:
        """The files of `paths` (the repo listing: names, or {path, size, sha256, blob_id, lfs} entries) not
        matching `ignore_patterns` (huggingface_hub's rule: fnmatch on the repo path, a trailing "/" means
        everything under it) into the cache, each cached copy checked against the listing first (see
        `verify_cached`); the snapshot folder. Offline: the cached snapshot folder, or OfflineMissError."""
        snap = Path(self.s.cache_dir) / snapshot_rel(repo_id, commit)
        if self.s.offline:
            if not snap.is_dir():
                raise errors.OfflineMissError(
                    f"{repo_id}@{commit[:12]}" + (f" ({what})" if what else "") + f": not in the cache "
                    f"{self.s.cache_dir} and offline mode is on; run once online to fetch it"
                )
        pats = [p + "*" if p.endswith("/") else p for p in ignore_patterns]
        missing: list[str] = []
        for item in paths:
            entry = item if isinstance(item, dict) else {"path": item}
            rel = names.repo_path(entry.get("path"), f"{repo_id}@{commit[:12]} listing")
            if any(fnmatch.fnmatchcase(rel, p) for p in pats):
                continue
            if verify_cached(self.s.cache_dir, repo_id, commit, rel, entry) is not None:
                continue
            if self.s.offline:
                if _needed_offline(rel):
                    missing.append(rel)
                continue
            self.download(repo_id, rel, commit, expect=entry if isinstance(item, dict) else None)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise errors.OfflineMissError(
                f"{repo_id}@{commit[:12]}" + (f" ({what})" if what else "") + f": offline mode is on and "
                f"{shown} {'is' if len(missing) == 1 else 'are'} not in the cache {self.s.cache_dir}; "
                "run once online to fetch them"
            )
        snap.mkdir(parents=True, exist_ok=True)
        return snap


# Files a stage reads when they are listed (config, tokenizer, chat template, remote code): offline, a listed
# one the cache lacks is an offline miss, named, rather than a misleading "no tokenizer files" later.
_OFFLINE_NEEDED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tekken.json",
    "chat_template.jinja",
    "chat_template.json",
    "*.model",
    "tokenizer.model.v*",
    "*.tiktoken",
    "*.py",
)


def _needed_offline(rel: str) -> bool:
    return "/" not in rel and any(fnmatch.fnmatchcase(rel, p) for p in _OFFLINE_NEEDED)
