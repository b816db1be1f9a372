"""A local Hugging Face Hub on 127.0.0.1 that unmodified huggingface_hub / transformers clients talk to.

`LocalHub(storage_dir)` keeps repos, commits, branches and tags (state.json) and content-addressed file
bytes (blobs/<sha256>) under `storage_dir`, and serves them over HTTP from a background thread with the
protocol huggingface_hub 2.4 and transformers 5.24 use (see /work/shared/reference/hub-protocol.md):

    GET  /api/models/{repo}[/revision/{rev}][?blobs=true]     repo info (sha, siblings, gated, ...)
    GET  /api/models/{repo}/tree/{rev}[/{path}]?recursive=    tree listing, paginated with Link headers
    POST /api/models/{repo}/paths-info/{rev}                   info on given paths
    GET  /api/models/{repo}/commits/{rev} and /refs            commit list, branches and tags
    HEAD/GET /{repo}/resolve/{rev}/{path}                      file metadata / bytes (Range -> 206);
                                                               LFS files redirect (302) to /_lfs/{sha256}
Errors carry the X-Error-Code the clients map to their exception classes. Test hooks: throttle(),
corrupt(), fail_next() (optionally with a Retry-After), cut_next(), stall() (a hub that accepts the
connection and never answers, or answers the headers and never sends the body), override_header() (a
hostile ETag or Location), allow_token(), and the
bytes_served / requests / authorizations records.

`python -m tests.support.hub_server --storage DIR [--port N] [--seed-demo]` serves in the foreground.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

GATED_TOKEN = "hf_localhub_granted_token"  # conftest grants it on test-org/gated and test-org/private
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
LFS_MIN_SIZE = 10 * 1024  # files this large (bytes) are stored as LFS, like the hub's .gitattributes rules
CHUNK = 256 * 1024
_API_KEYWORDS = {"revision", "tree", "commits", "refs", "paths-info", "resolve"}
_EPOCH = 1_704_067_200  # 2024-01-01T00:00:00Z: commit dates are this plus the commit's index, deterministic


def git_blob_sha1(data: bytes) -> str:
    """Git's object id of a blob holding `data` (what the hub calls blobId / oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


@dataclass
class FileEntry:
    """One file of a commit: its size, sha256 (names the blob on disk), git blob id and LFS flag."""

    size: int
    sha256: str
    blob_id: str  # git sha1 of the content (regular file) or of the LFS pointer (LFS file)
    lfs: bool

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    date: str
    files: dict[str, FileEntry] = field(default_factory=dict)


@dataclass
class Repo:
    repo_id: str
    gated: bool = False
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)

    def resolve(self, rev: str) -> str | None:
        """Branch, tag, `refs/heads/X`, `refs/tags/X` or a full commit sha -> commit sha (None if unknown)."""
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if rev.startswith("refs/heads/") and rev[11:] in self.branches:
            return self.branches[rev[11:]]
        if rev.startswith("refs/tags/") and rev[10:] in self.tags:
            return self.tags[rev[10:]]
        if rev in self.commits:
            return rev
        return None


class HubError(Exception):
    """An error reply: status, X-Error-Code and message (plus X-Repo-Commit where the hub sends one)."""

    def __init__(
        self, status: int, code: str | None, message: str, commit: str | None = None, retry_after: str | None = None
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit
        self.retry_after = retry_after


class LocalHub:
    """A Hugging Face Hub compatible HTTP server for tests: repos live under `storage_dir`."""

    def __init__(self, storage_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0):
        self.storage = Path(storage_dir)
        self.blobs = self.storage / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.host, self.port = host, port
        self.tree_page_size = 1000  # tree entries per page; lower it to exercise Link pagination
        self._lock = threading.RLock()
        self._repos: dict[str, Repo] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._throttle: float | None = None
        self._corrupt: set[tuple[str, str]] = set()
        self._fail: list[tuple[int, str | None, str | None]] = []  # (status, path substring, Retry-After)
        self._cut: list[tuple[int, str | None]] = []  # (bytes, file key substring) per upcoming file GET
        self._stall: list[tuple[str, str | None]] = []  # (mode, path substring): every matching request
        self._headers: list[tuple[str, str, str | None]] = []  # (header, value, path substring): file answers
        self._release = threading.Event()  # set: stalled handlers give up and close their connection
        self._auth: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header or None)
        self._bytes_served: collections.Counter[str] = collections.Counter()
        self._requests: collections.Counter[str] = collections.Counter()
        self._downloads: collections.Counter[str] = collections.Counter()
        self._log: list[tuple[str, str, int]] = []
        self.seeded: dict[str, str] = {}  # repo_id -> main sha, filled by whoever seeds the hub
        self._load_state()

    # ---------------------------------------------------------------------------------- repos & commits
    def create_repo(self, repo_id: str, gated: bool = False, private: bool = False, exist_ok: bool = True) -> Repo:
        with self._lock:
            if repo_id in self._repos:
                if not exist_ok:
                    raise ValueError(f"repo {repo_id} already exists")
                repo = self._repos[repo_id]
                repo.gated, repo.private = gated, private
            else:
                repo = self._repos[repo_id] = Repo(repo_id, gated=gated, private=private)
            self._save_state()
            return repo

    def allow_token(self, repo_id: str, token: str) -> None:
        """Grant `token` access to a gated or private repo."""
        with self._lock:
            self._repo(repo_id).tokens.add(token)
            self._save_state()

    def commit(
        self,
        repo_id: str,
        files: str | os.PathLike | Mapping[str, bytes | str | os.PathLike],
        branch: str = "main",
        tag: str | None = None,
        message: str | None = None,
        replace: bool = False,
        delete: tuple[str, ...] | list[str] = (),
    ) -> str:
        """Commit a folder or {path: bytes|str|Path} on top of `branch` (created if new); return the sha.

        Files are added or overwritten on top of the branch's current tree (like upload_folder);
        replace=True makes the tree exactly `files`; `delete` removes paths. The repo is created if new.
        A commit that changes nothing returns the branch's current sha (and still applies `tag`).
        """
        with self._lock:
            repo = self._repos.get(repo_id) or self.create_repo(repo_id)
            staged = self._stage_files(files)
            parent = repo.branches.get(branch)
            tree = {} if (replace or parent is None) else dict(repo.commits[parent].files)
            for path in delete:
                tree.pop(path, None)
            tree.update(staged)
            if parent is not None and tree == repo.commits[parent].files:
                digest = parent  # nothing changed: no new commit (re-seeding a storage dir keeps its shas)
                if tag:
                    repo.tags[tag] = digest
                self._save_state()
                return digest
            message = message or f"commit {len(repo.commits) + 1}"
            digest = hashlib.sha1(
                json.dumps(
                    {
                        "repo": repo_id,
                        "parent": parent,
                        "message": message,
                        "files": sorted((p, e.sha256) for p, e in tree.items()),
                    },
                    sort_keys=True,
                ).encode()
            ).hexdigest()
            if digest not in repo.commits:
                repo.commits[digest] = Commit(
                    sha=digest, parent=parent, message=message, date=_iso(_EPOCH + len(repo.commits)), files=tree
                )
            repo.branches[branch] = digest
            if tag:
                repo.tags[tag] = digest
            self._save_state()
            return digest

    def tag(self, repo_id: str, tag: str, revision: str = "main") -> str:
        with self._lock:
            repo = self._repo(repo_id)
            sha = repo.resolve(revision)
            if sha is None:
                raise KeyError(f"revision {revision} not in {repo_id}")
            repo.tags[tag] = sha
            self._save_state()
            return sha

    def resolve(self, repo_id: str, revision: str = "main") -> str | None:
        with self._lock:
            return self._repo(repo_id).resolve(revision)

    def file_entry(self, repo_id: str, path: str, revision: str = "main") -> FileEntry:
        with self._lock:
            repo = self._repo(repo_id)
            return repo.commits[repo.resolve(revision)].files[path]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, FileEntry]:
        with self._lock:
            repo = self._repo(repo_id)
            return dict(repo.commits[repo.resolve(revision)].files)

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self._repos:
            raise KeyError(f"no repo {repo_id} on this hub")
        return self._repos[repo_id]

    def _stage_files(self, files) -> dict[str, FileEntry]:
        """Store file bytes as blobs/<sha256> and return their entries."""
        out: dict[str, FileEntry] = {}
        if isinstance(files, (str, os.PathLike)):
            root = Path(files)
            items = [
                (p.relative_to(root).as_posix(), p)
                for p in sorted(root.rglob("*"))
                if p.is_file() and not any(part in (".git", ".cache") for part in p.relative_to(root).parts)
            ]
        else:
            items = list(files.items())
        staged = [
            (rel, src.encode() if isinstance(src, str) and not isinstance(files, (str, os.PathLike)) else src)
            for rel, src in items
        ]
        # Hash big files in parallel (hashlib releases the GIL): committing GBs of shards stays quick.
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            for rel, entry in zip([r for r, _ in staged], pool.map(lambda it: self._store(*it), staged), strict=True):
                out[rel] = entry
        return out

    def _store(self, rel: str, src: bytes | os.PathLike) -> FileEntry:
        if isinstance(src, (bytes, bytearray)):
            data = bytes(src)
            sha = hashlib.sha256(data).hexdigest()
            size = len(data)
            if not (self.blobs / sha).exists():
                self._atomic_write(self.blobs / sha, data)
        else:
            src = Path(src)
            h = hashlib.sha256()
            with open(src, "rb") as f:
                while chunk := f.read(8 * 1024 * 1024):
                    h.update(chunk)
            sha, size = h.hexdigest(), src.stat().st_size
            dst = self.blobs / sha
            if not dst.exists():
                tmp = dst.with_name(dst.name + f".tmp{threading.get_ident()}")
                try:
                    if size >= 64 * 1024 * 1024:
                        os.link(src, tmp)  # big benchmark files: no copy
                    else:
                        shutil.copyfile(src, tmp)
                except OSError:
                    shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
            data = None
        lfs = rel.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
        if lfs:
            blob_id = git_blob_sha1(lfs_pointer(sha, size))
        else:
            blob_id = git_blob_sha1(data if data is not None else (self.blobs / sha).read_bytes())
        return FileEntry(size=size, sha256=sha, blob_id=blob_id, lfs=lfs)

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + f".tmp{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _save_state(self) -> None:
        state = {}
        for rid, r in self._repos.items():
            d = asdict(r)
            d["tokens"] = sorted(r.tokens)
            state[rid] = d
        self._atomic_write(self.storage / "state.json", json.dumps(state, sort_keys=True).encode())

    def _load_state(self) -> None:
        path = self.storage / "state.json"
        if not path.exists():
            return
        for rid, d in json.loads(path.read_text()).items():
            commits = {
                sha: Commit(**{**c, "files": {p: FileEntry(**e) for p, e in c["files"].items()}})
                for sha, c in d["commits"].items()
            }
            self._repos[rid] = Repo(
                repo_id=rid,
                gated=d["gated"],
                private=d["private"],
                commits=commits,
                branches=d["branches"],
                tags=d["tags"],
                tokens=set(d["tokens"]),
            )

    # ------------------------------------------------------------------------------------------ test hooks
    def throttle(self, bytes_per_second: float | None) -> None:
        """Serve file bodies at about `bytes_per_second` (None: full speed)."""
        self._throttle = bytes_per_second

    def corrupt(self, repo_id: str, path: str, enabled: bool = True) -> None:
        """Serve `path` with one byte flipped: same size, wrong sha256 / etag."""
        with self._lock:
            (self._corrupt.add if enabled else self._corrupt.discard)((repo_id, path))

    def fail_next(
        self, n: int = 1, status: int = 503, match: str | None = None, retry_after: str | None = None
    ) -> None:
        """Answer the next `n` requests (whose URL path contains `match`, if given) with `status`, and a
        `Retry-After: <retry_after>` header when given (seconds or an HTTP date)."""
        with self._lock:
            self._fail.extend([(status, match, retry_after)] * n)

    def stall(self, mode: str = "answer", match: str | None = None) -> None:
        """Stall every request whose URL path contains `match` (all, if None) until reset_hooks/stop:
        mode "answer" reads the request and never answers; mode "body" (file GETs) sends the status and
        headers of a file, then never sends its bytes."""
        if mode not in ("answer", "body"):
            raise ValueError(f"stall mode {mode!r}: use 'answer' or 'body'")
        with self._lock:
            self._release.clear()
            self._stall.append((mode, match))

    def override_header(self, header: str, value: str, match: str | None = None) -> None:
        """Send `header: value` instead of the real one in every file answer (HEAD/GET of /resolve/ and the LFS
        redirect) whose "{repo_id}/{path}" contains `match`: a hostile ETag, X-Linked-Etag or Location."""
        with self._lock:
            self._headers.append((header, value, match))

    def _overridden(self, key: str, headers: dict[str, str]) -> dict[str, str]:
        with self._lock:
            for header, value, match in self._headers:
                if match is None or match in key:
                    headers = {**headers, header: value}
        return headers

    def _stalled(self, mode: str, path: str) -> bool:
        with self._lock:
            return any(m == mode and (match is None or match in path) for m, match in self._stall)

    def _hold(self) -> None:
        """Block a handler until the stall is lifted (at most 120 s), then drop its connection."""
        self._release.wait(120)

    @property
    def authorizations(self) -> list[tuple[str, str, str | None]]:
        """Every request's (method, decoded URL path, Authorization header or None), in order."""
        with self._lock:
            return list(self._auth)

    def cut_next(self, after_bytes: int, n: int = 1, match: str | None = None) -> None:
        """Drop the connection after `after_bytes` body bytes of the next `n` file GETs (whose
        "{repo_id}/{path}" contains `match`, if given): a network failure mid-download."""
        with self._lock:
            self._cut.extend([(after_bytes, match)] * n)

    @property
    def bytes_served(self) -> dict[str, int]:
        """Body bytes sent per file, keyed "{repo_id}/{path}" (resolve and LFS blob GETs together)."""
        with self._lock:
            return dict(self._bytes_served)

    @property
    def requests(self) -> dict[str, int]:
        """Request counts keyed "METHOD /decoded/url/path" (query string dropped)."""
        with self._lock:
            return dict(self._requests)

    @property
    def request_log(self) -> list[tuple[str, str, int]]:
        """Every request in order as (method, raw path with query, status)."""
        with self._lock:
            return list(self._log)

    @property
    def downloads(self) -> dict[str, int]:
        """GET requests that served file bytes (whole or a Range), keyed "{repo_id}/{path}"."""
        with self._lock:
            return dict(self._downloads)

    def reset_counters(self) -> None:
        with self._lock:
            self._bytes_served.clear()
            self._requests.clear()
            self._downloads.clear()
            self._log.clear()
            self._auth.clear()

    def reset_hooks(self) -> None:
        """Undo throttle / corrupt / fail_next / tree_page_size and zero the counters."""
        with self._lock:
            self._throttle = None
            self._corrupt.clear()
            self._fail.clear()
            self._cut.clear()
            self._stall.clear()
            self._headers.clear()
            self._release.set()
            self.tree_page_size = 1000
        self.reset_counters()

    # ------------------------------------------------------------------------------------------- server
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not started: call start() first")
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> LocalHub:
        if self._server is not None:
            return self
        hub = self

        class Handler(_HubHandler):
            pass

        Handler.hub = hub
        server = ThreadingHTTPServer((self.host, self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------- request bookkeeping
    def _record(self, method: str, raw: str, status: int) -> None:
        with self._lock:
            self._requests[f"{method} {unquote(urlsplit(raw).path)}"] += 1
            self._log.append((method, raw, status))

    def _take_cut(self, key: str) -> int | None:
        with self._lock:
            for i, (after, match) in enumerate(self._cut):
                if match is None or match in key:
                    del self._cut[i]
                    return after
        return None

    def _take_failure(self, path: str) -> tuple[int, str | None] | None:
        with self._lock:
            for i, (status, match, retry_after) in enumerate(self._fail):
                if match is None or match in path:
                    del self._fail[i]
                    return status, retry_after
        return None


def _auth_check(repo: Repo, token: str | None) -> None:
    """Raise the hub's error for a gated or private repo the token may not read."""
    if repo.private:
        if token is None:
            raise HubError(401, "RepoNotFound", f"Repository {repo.repo_id} not found (private; no token)")
        if token not in repo.tokens:
            raise HubError(404, "RepoNotFound", f"Repository {repo.repo_id} not found")
    elif repo.gated:
        if token is None:
            raise HubError(
                401,
                "GatedRepo",
                f"Access to model {repo.repo_id} is restricted. You must have access "
                "to it and be authenticated to access it. Please log in.",
            )
        if token not in repo.tokens:
            raise HubError(
                403,
                "GatedRepo",
                f"Access to model {repo.repo_id} is restricted and you are not in the authorized list.",
            )


class _HubHandler(BaseHTTPRequestHandler):
    """Routes one request against `hub` (set on a per-server subclass)."""

    hub: LocalHub
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the default stderr log
        pass

    # ------------------------------------------------------------------------------------ dispatch
    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        self._status = 0
        split = urlsplit(self.path)
        self._query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        segs = [s for s in split.path.split("/") if s != ""]
        with hub._lock:
            hub._auth.append((method, unquote(split.path), self.headers.get("Authorization")))
        if hub._stalled("answer", unquote(split.path)):
            hub._hold()
            self.close_connection = True
            return
        try:
            failure = hub._take_failure(unquote(split.path))
            if failure is not None:
                status, retry_after = failure
                raise HubError(status, None, f"simulated failure {status}", retry_after=retry_after)
            if segs[:2] == ["api", "models"] and len(segs) > 2:
                self._api_models(method, segs[2:])
            elif segs[:1] == ["_lfs"] and len(segs) == 2:
                self._lfs(method, segs[1])
            elif "resolve" in segs[1:3]:
                self._resolve(method, segs)
            else:
                raise HubError(404, None, f"Not found: {unquote(split.path)}")
        except HubError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # ------------------------------------------------------------------------------------- helpers
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:].strip() or None if auth.lower().startswith("bearer ") else None

    def _split_repo(self, segs: list[str]) -> tuple[str, list[str]]:
        """Split decoded-later URL segments into (repo_id, rest): repo ids have one or two parts."""
        if len(segs) >= 2 and "/".join(segs[:2]) in self.hub._repos:
            return unquote("/".join(segs[:2])), segs[2:]
        if segs[0] in self.hub._repos or (len(segs) > 1 and segs[1] in _API_KEYWORDS):
            return unquote(segs[0]), segs[1:]
        return unquote("/".join(segs[:2])), segs[2:]

    def _get_repo(self, repo_id: str, gate_files: bool) -> Repo:
        repo = self.hub._repos.get(repo_id)
        if repo is None:
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        if repo.private or gate_files:
            _auth_check(repo, self._token())
        return repo

    def _commit(self, repo: Repo, rev: str) -> Commit:
        sha = repo.resolve(rev)
        if sha is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo.commits[sha]

    def _start_response(self, status: int) -> None:
        """Record the request, then send the status line (recording first: a client that has the reply
        must find it in the counters)."""
        self._status = status
        self.hub._record(self.command, self.path, status)
        self.send_response(status)

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"", head: bool = False) -> None:
        self._start_response(status)
        headers = {"Content-Length": str(len(body)), **headers}
        headers.setdefault("Date", formatdate(usegmt=True))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, extra: dict[str, str] | None = None, head: bool = False) -> None:
        body = json.dumps(obj).encode()
        self._send(status, {"Content-Type": "application/json; charset=utf-8", **(extra or {})}, body, head)

    def _error(self, e: HubError) -> None:
        headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": e.message}
        if e.code:
            headers["X-Error-Code"] = e.code
        if e.commit:
            headers["X-Repo-Commit"] = e.commit
        if e.retry_after is not None:
            headers["Retry-After"] = e.retry_after
        try:
            self._send(e.status, headers, json.dumps({"error": e.message}).encode(), head=self.command == "HEAD")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # ----------------------------------------------------------------------------------- /api/models
    def _api_models(self, method: str, segs: list[str]) -> None:
        hub = self.hub
        with hub._lock:
            repo_id, rest = self._split_repo(segs)
            repo = self._get_repo(repo_id, gate_files=False)
            action = rest[0] if rest else None
            if action is None and method in ("GET", "HEAD"):
                return self._json(self._info(repo, self._commit(repo, "main")), head=method == "HEAD")
            if action == "revision" and len(rest) >= 2:
                rev = unquote("/".join(rest[1:]))
                return self._json(self._info(repo, self._commit(repo, rev)), head=method == "HEAD")
            if action == "tree" and len(rest) >= 2:
                commit = self._commit(repo, unquote(rest[1]))
                return self._tree(repo, commit, unquote("/".join(rest[2:])))
            if action == "paths-info" and len(rest) >= 2 and method == "POST":
                return self._paths_info(self._commit(repo, unquote(rest[1])))
            if action == "commits" and len(rest) >= 2:
                return self._commits(repo, self._commit(repo, unquote("/".join(rest[1:]))))
            if action == "refs":
                return self._json(
                    {
                        "branches": [
                            {"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                            for b, s in sorted(repo.branches.items())
                        ],
                        "tags": [
                            {"name": t, "ref": f"refs/tags/{t}", "targetCommit": s}
                            for t, s in sorted(repo.tags.items())
                        ],
                        "converts": [],
                    }
                )
        raise HubError(404, None, f"Not found: /api/models/{'/'.join(segs)}")

    def _info(self, repo: Repo, commit: Commit) -> dict[str, Any]:
        blobs = self._query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, e in sorted(commit.files.items()):
            s: dict[str, Any] = {"rfilename": path}
            if blobs:
                s.update(size=e.size, blobId=e.blob_id)
                if e.lfs:
                    s["lfs"] = {"sha256": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
            siblings.append(s)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": _iso(_EPOCH),
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": ["transformers", "safetensors", "text-generation"],
            "pipeline_tag": "text-generation",
            "library_name": "transformers",
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        config = self._read_json(commit, "config.json")
        if isinstance(config, dict):
            info["config"] = {k: config[k] for k in ("architectures", "model_type") if k in config}
        st = self._safetensors_summary(commit)
        if st:
            info["safetensors"] = st
        return info

    def _read_json(self, commit: Commit, path: str) -> Any:
        e = commit.files.get(path)
        if e is None:
            return None
        try:
            return json.loads((self.hub.blobs / e.sha256).read_bytes())
        except (OSError, ValueError):
            return None

    def _safetensors_summary(self, commit: Commit) -> dict[str, Any] | None:
        """Parameter counts per dtype from the safetensors headers, as the hub reports them."""
        params: collections.Counter[str] = collections.Counter()
        for path, e in commit.files.items():
            if not path.endswith(".safetensors") or "/" in path:
                continue
            try:
                with open(self.hub.blobs / e.sha256, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(n)) if n < 100_000_000 else {}
            except (OSError, ValueError):
                return None
            for name, t in header.items():
                if name == "__metadata__":
                    continue
                count = 1
                for d in t["shape"]:
                    count *= d
                params[t["dtype"]] += count
        if not params:
            return None
        return {"parameters": dict(params), "total": sum(params.values())}

    def _entry(self, path: str, e: FileEntry, commit: Commit, expand: bool) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "file", "oid": e.blob_id, "size": e.size, "path": path}
        if e.lfs:
            d["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
        if expand:
            d["lastCommit"] = {"id": commit.sha, "title": commit.message, "date": commit.date}
        return d

    def _tree(self, repo: Repo, commit: Commit, prefix: str) -> None:
        recursive = self._query.get("recursive", "").lower() in ("1", "true")
        expand = self._query.get("expand", "").lower() in ("1", "true")
        prefix = prefix.strip("/")
        base = prefix + "/" if prefix else ""
        files = {p: e for p, e in commit.files.items() if p.startswith(base)}
        if prefix and not files:
            raise HubError(404, "EntryNotFound", f"{prefix} does not exist on {commit.sha}", commit.sha)
        entries: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for path, e in sorted(files.items()):
            rel_parts = path[len(base) :].split("/")
            for depth in range(1, len(rel_parts)):
                d = base + "/".join(rel_parts[:depth])
                if (recursive or depth == 1) and d not in dirs:
                    dirs.add(d)
                    entries.append(
                        {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                    )
            if recursive or len(rel_parts) == 1:
                entries.append(self._entry(path, e, commit, expand))
        entries.sort(key=lambda x: (x["type"] != "directory", x["path"]))
        start = int(self._query.get("cursor", "0") or 0)
        page = entries[start : start + self.hub.tree_page_size]
        extra = {}
        if start + self.hub.tree_page_size < len(entries):
            nxt = (
                f"{self.hub.url}{urlsplit(self.path).path}?recursive={str(recursive).lower()}"
                f"&expand={str(expand).lower()}&cursor={start + self.hub.tree_page_size}"
            )
            extra["Link"] = f'<{nxt}>; rel="next"'
        self._json(page, extra=extra)

    def _paths_info(self, commit: Commit) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            form = json.loads(body or "{}")
            paths = form.get("paths", [])
            expand = bool(form.get("expand"))
        else:
            form = parse_qs(body)
            paths = form.get("paths", [])
            expand = (form.get("expand", ["false"])[-1]).lower() in ("1", "true")
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files:
                out.append(self._entry(p, commit.files[p], commit, expand))
            elif any(f.startswith(p + "/") for f in commit.files):
                out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p})
        self._json(out)

    def _commits(self, repo: Repo, commit: Commit) -> None:
        out, cur = [], commit
        while cur is not None:
            out.append(
                {
                    "id": cur.sha,
                    "title": cur.message,
                    "message": "",
                    "date": cur.date,
                    "authors": [{"user": "localhub", "avatar": ""}],
                }
            )
            cur = repo.commits.get(cur.parent) if cur.parent else None
        self._json(out)

    # ------------------------------------------------------------------------------------- file bytes
    def _resolve(self, method: str, segs: list[str]) -> None:
        hub = self.hub
        if method not in ("GET", "HEAD"):
            raise HubError(405, None, "method not allowed")
        with hub._lock:
            i = segs.index("resolve", 1)
            repo_id = unquote("/".join(segs[:i]))
            if len(segs) < i + 3:
                raise HubError(404, None, "Not found")
            rev, path = unquote(segs[i + 1]), unquote("/".join(segs[i + 2 :]))
            repo = self._get_repo(repo_id, gate_files=True)
            commit = self._commit(repo, rev)
            e = commit.files.get(path)
            if e is None:
                raise HubError(404, "EntryNotFound", f"{path} does not exist on {commit.sha}", commit.sha)
        common = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes", "Vary": "Origin, Accept"}
        if e.lfs:
            location = (
                f"/_lfs/{e.sha256}?repo={quote(repo_id, safe='')}&commit={commit.sha}&path={quote(path, safe='')}"
            )
            self._send(
                302,
                hub._overridden(
                    f"{repo_id}/{path}",
                    {
                        **common,
                        "Location": location,
                        "ETag": f'"{e.blob_id}"',
                        "X-Linked-Etag": f'"{e.sha256}"',
                        "X-Linked-Size": str(e.size),
                        "Content-Type": "text/plain; charset=utf-8",
                    },
                ),
            )
            return
        headers = hub._overridden(f"{repo_id}/{path}", {**common, "ETag": f'"{e.blob_id}"'})
        self._serve_bytes(method, repo_id, path, e, headers)

    def _lfs(self, method: str, sha256: str) -> None:
        hub = self.hub
        repo_id, commit_sha, path = (self._query.get(k, "") for k in ("repo", "commit", "path"))
        with hub._lock:
            repo = self._get_repo(repo_id, gate_files=True)
            commit = repo.commits.get(commit_sha)
            e = commit.files.get(path) if commit else None
            if e is None or e.sha256 != sha256:
                raise HubError(404, "EntryNotFound", f"blob {sha256} not found", commit_sha or None)
        headers = {
            "X-Repo-Commit": commit_sha,
            "ETag": f'"{sha256}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        headers = {k: v for k, v in hub._overridden(f"{repo_id}/{path}", headers).items() if k != "Location"}
        if "X-Linked-Etag" in hub._overridden(f"{repo_id}/{path}", {}):  # the LFS file's hostile id, here too
            headers["ETag"] = hub._overridden(f"{repo_id}/{path}", {})["X-Linked-Etag"]
        self._serve_bytes(method, repo_id, path, e, headers)

    def _serve_bytes(self, method: str, repo_id: str, path: str, e: FileEntry, headers: dict[str, str]) -> None:
        hub = self.hub
        size = e.size
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first = rng[6:].split(",")[0].strip()
            a, _, b = first.partition("-")
            try:
                if a == "":
                    start, end = max(0, size - int(b)), size - 1
                else:
                    start = int(a)
                    end = min(int(b), size - 1) if b else size - 1
            except ValueError:
                start, end = 0, size - 1
            if start >= size or start > end:
                self._send(416, {**headers, "Content-Range": f"bytes */{size}"}, head=True)
                return
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        length = max(0, end - start + 1)
        ctype = "application/json" if path.endswith(".json") else "application/octet-stream"
        self._start_response(status)
        for k, v in {**headers, "Content-Type": ctype, "Content-Length": str(length)}.items():
            self.send_header(k, v)
        self.end_headers()
        if method == "HEAD" or length == 0:
            return
        if hub._stalled("body", unquote(urlsplit(self.path).path)) or hub._stalled("body", f"{repo_id}/{path}"):
            self.wfile.flush()
            hub._hold()
            self.close_connection = True
            return
        with hub._lock:
            hub._downloads[f"{repo_id}/{path}"] += 1
        corrupt = (repo_id, path) in hub._corrupt
        cut = hub._take_cut(f"{repo_id}/{path}")
        flip_at = size // 2
        key = f"{repo_id}/{path}"
        with open(hub.blobs / e.sha256, "rb") as f:
            if not corrupt and cut is None and hub._throttle is None:
                with hub._lock:
                    hub._bytes_served[key] += length  # counted before sending: see _start_response
                self.wfile.flush()
                self.connection.sendfile(f, offset=start, count=length)  # zero-copy fast path
                return
            f.seek(start)
            pos, left = start, length
            t0, sent = time.monotonic(), 0
            while left > 0:
                rate = hub._throttle
                chunk = f.read(min(left, CHUNK if rate is None else max(1024, min(CHUNK, int(rate) // 20))))
                if not chunk:
                    break
                if corrupt and pos <= flip_at < pos + len(chunk):
                    b = bytearray(chunk)
                    b[flip_at - pos] ^= 0xFF
                    chunk = bytes(b)
                if cut is not None and sent + len(chunk) >= cut:
                    with hub._lock:
                        hub._bytes_served[key] += cut - sent
                    self.wfile.write(chunk[: cut - sent])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                with hub._lock:
                    hub._bytes_served[key] += len(chunk)  # counted before sending: see _start_response
                self.wfile.write(chunk)
                pos += len(chunk)
                left -= len(chunk)
                sent += len(chunk)
                if rate:
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)


# ---------------------------------------------------------------------------------------------- CLI
def seed_demo(hub: LocalHub, work_dir: str | os.PathLike | None = None) -> str:
    """Commit a tiny single-safetensors Qwen2 repo as prestage-demo/tiny-qwen2; return its sha."""
    import tempfile

    from tests.support.checkpoints import build_checkpoint

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        path = build_checkpoint(Path(tmp) / "tiny-qwen2", layout="single", arch="qwen2", seed=0)
        return hub.commit("prestage-demo/tiny-qwen2", path, message="tiny qwen2 demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.hub_server", description="Serve a local Hugging Face Hub from a storage folder."
    )
    parser.add_argument("--storage", required=True, help="folder holding state.json and blobs/")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--seed-demo", action="store_true", help="commit prestage-demo/tiny-qwen2 first")
    args = parser.parse_args(argv)
    hub = LocalHub(args.storage, host=args.host, port=args.port)
    if args.seed_demo:
        seed_demo(hub)
    hub.start()
    print(hub.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
