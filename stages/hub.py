"""Talking to a Hugging Face hub the way huggingface_hub does, shared by every stage.

- `settings(params)`: endpoint, token (kept secret), cache root and offline mode, from flags and the HF
  environment (HF_ENDPOINT, HF_TOKEN / HUGGING_FACE_HUB_TOKEN / token file, HF_HUB_CACHE / HF_HOME,
  HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE). `--download-dir` replaces the cache root, `--offline` forces offline.
- `prepare_env(s)`: sets the environment huggingface_hub reads at import, before it is imported.
- Cache reads by the documented layout (refs/, snapshots/), with no import of huggingface_hub: the cached
  path of a stage stays fast and makes no network call.
- Names from outside checked before they touch a path (stages/names.py): the revision of a refs/ file, the
  ETag that names a blob, every repo file name. `verify_cached(...)`: a cached file checked against the
  listing's sha256 (LFS) or git blob id (other files) before it is used; a mismatch deletes it (integrity).
- `translate(e, ...)`: a huggingface_hub / transformers exception as a one-line PrestageError.
- `HubClient(s)`: every network call prestage makes (repo info, one file into the cache at a commit,
  resumable and stoppable, the non-weight snapshot), each with connect/read timeouts, bounded retries that
  honour Retry-After, the token given or none (never the library's own lookup), huggingface_hub's log
  chatter folded into one reporter line per retry, and errors translated. See `STALL_BOUND_S`. A download
  is checked against its ETag and the listing before it becomes a blob, under a per-blob file lock shared
  with huggingface_hub (two processes never write one partial file).
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

from prestage.stages import errors, names
from prestage.stages.base import opt

# The hub flags every stage command accepts (the runner adds them; a stage may read them from params).
OPTIONS = (
    opt(
        "--hf-token",
        default=None,
        metavar="TOKEN",
        help="Hub token (default: HF_TOKEN, then HUGGING_FACE_HUB_TOKEN, then the token file). Never recorded.",
    ),
    opt("--download-dir", default=None, metavar="DIR", help="Hugging Face cache root to use instead of HF_HUB_CACHE."),
    opt("--offline", is_flag=True, default=False, help="Make no network call: cache only (same as HF_HUB_OFFLINE=1)."),
)

DEFAULT_ENDPOINT = "https://huggingface.co"
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "on", "yes", "true", "y"}


@dataclass(frozen=True)
class HubSettings:
    endpoint: str
    token: str | None  # never recorded, never printed
    token_source: str | None
    cache_dir: Path
    offline: bool

    @property
    def token_state(self) -> str:
        return "present" if self.token else "absent"

    def __repr__(self) -> str:  # keep the token out of any log or traceback
        return (
            f"HubSettings(endpoint={self.endpoint!r}, token={self.token_state}, "
            f"cache_dir={str(self.cache_dir)!r}, offline={self.offline})"
        )


def env_true(name: str) -> bool:
    """Whether an environment variable is set to a true value (1, true, yes, on, y; any case)."""
    return os.environ.get(name, "").strip().lower() in _TRUE


def default_cache_dir() -> Path:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _token_from_env() -> tuple[str | None, str | None]:
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var, "").strip():
            return os.environ[var].strip(), var
    path = os.environ.get("HF_TOKEN_PATH")
    if not path:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
        )
        path = os.path.join(home, "token")
    try:
        tok = Path(path).read_text().strip()
    except OSError:
        return None, None
    return (tok, "token file") if tok else (None, None)


def settings(params: dict) -> HubSettings:
    token, source = (params.get("hf_token"), "--hf-token") if params.get("hf_token") else _token_from_env()
    # cache_dir: the run's cache root as stages/paths.py decided it; else --download-dir; else the environment's
    chosen = params.get("cache_dir") or params.get("download_dir")
    cache = Path(chosen).expanduser() if chosen else default_cache_dir()
    offline = bool(params.get("offline")) or env_true("HF_HUB_OFFLINE") or env_true("TRANSFORMERS_OFFLINE")
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    return HubSettings(endpoint=endpoint, token=token, token_source=source, cache_dir=cache.absolute(), offline=offline)


def prepare_env(s: HubSettings) -> None:
    """Set what huggingface_hub reads when it is imported (constants), then it may be imported."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DISABLE_SAFETENSORS_CONVERSION", "1")
    os.environ["HF_ENDPOINT"] = s.endpoint
    if s.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"


# ---- the cache, read by its documented layout -------------------------------------------------------


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


def translate(
    e: BaseException, *, repo_id: str, revision: str | None, s: HubSettings, what: str = ""
) -> errors.PrestageError:
    """A hub or transformers exception as one PrestageError line naming the repo and revision."""
    from huggingface_hub import errors as hf

    rev = revision or "main"
    where = f"{repo_id}@{rev}" + (f" ({what})" if what else "")
    tok = (
        ("a token was given" + (f" via {s.token_source}" if s.token_source else ""))
        if s.token
        else "no token was given"
    )
    cause = e
    while (
        cause is not None
        and not isinstance(cause, hf.HfHubHTTPError)
        and not isinstance(cause, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled))
    ):
        cause = cause.__cause__ or cause.__context__
        if cause is e:
            break
    err = cause if cause is not None else e
    if isinstance(err, hf.GatedRepoError):
        fix = (
            "ask for access on the model page, then set HF_TOKEN or --hf-token"
            if not s.token
            else "the token has no access: request access on the model page or use another token"
        )
        return errors.AuthError(f"{where}: gated repo and {tok}; {fix}")
    if isinstance(err, hf.RevisionNotFoundError):
        return errors.NotFoundError(
            f"{where}: revision '{rev}' does not exist; pass an existing branch, tag or commit with --revision"
        )
    if isinstance(err, hf.RepositoryNotFoundError):
        hint = (
            "check the id, or set HF_TOKEN / --hf-token if it is private"
            if not s.token
            else "check the id; if it is private, the token has no access to it"
        )
        return errors.NotFoundError(f"{where}: repository not found ({tok}); {hint}")
    if isinstance(err, hf.EntryNotFoundError) and not isinstance(err, hf.LocalEntryNotFoundError):
        return errors.NotFoundError(f"{where}: file not found in the repo at this revision")
    if isinstance(err, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        if s.offline:
            return errors.OfflineMissError(
                f"{where}: not in the cache {s.cache_dir} and offline mode is on; "
                "run once online (unset HF_HUB_OFFLINE / drop --offline) to fetch it"
            )
        return errors.NetworkError(
            f"{where}: hub {s.endpoint} unreachable and not in the cache; check the network or HF_ENDPOINT"
        )
    if isinstance(err, hf.HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            return errors.AuthError(
                f"{where}: the hub refused access (HTTP {status}, {tok}); set HF_TOKEN or "
                "--hf-token with a token that can read this repo"
            )
        return errors.NetworkError(
            f"{where}: hub {s.endpoint} answered HTTP {status}; retry later or check HF_ENDPOINT"
        )
    if _is_connection_error(err):
        return errors.NetworkError(
            f"{where}: hub {s.endpoint} unreachable ({type(err).__name__}); check the "
            "network or HF_ENDPOINT, or use --offline with a filled cache"
        )
    return errors.PrestageError(f"{where}: {type(err).__name__}: {err}")


def _is_connection_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(
        names
        & {
            "ConnectError",
            "ConnectTimeout",
            "ReadTimeout",
            "TimeoutException",
            "NetworkError",
            "ConnectionError",
            "RemoteProtocolError",
            "ProtocolError",
            "TransportError",
        }
    ) or isinstance(e, (ConnectionError, TimeoutError))


def _is_transient(e: BaseException) -> bool:
    from huggingface_hub import errors as hf

    if isinstance(e, (hf.RepositoryNotFoundError, hf.RevisionNotFoundError, hf.EntryNotFoundError)):
        return False
    if isinstance(e, hf.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        return status in (429, 500, 502, 503, 504)
    return _is_connection_error(e)


# ---- the one hub client -----------------------------------------------------------------------------

CONNECT_TIMEOUT_S = 10.0  # to open a connection to the hub
READ_TIMEOUT_S = 30.0  # for each read of an answer (a status line, a header block, a chunk of a body)
ATTEMPTS = 3  # tries per hub call for a transient failure (connection, timeout, 429, 5xx)
BACKOFF_S = (0.5, 1.0)  # the wait before the 2nd and the 3rd try when the hub gave no Retry-After
RETRY_AFTER_CAP_S = 30.0  # the longest Retry-After honoured; a hub asking more ends the call at once
TIMEOUT_ENV = "PRESTAGE_HUB_TIMEOUT"  # "SECONDS" (connect and read) or "CONNECT,READ"


def call_bound(connect: float, read: float) -> float:
    """Seconds after which a hub call that gets no answer has ended in a NetworkError (every try waits at
    most connect + read, then the backoff); Retry-After waits the hub asked for come on top."""
    return ATTEMPTS * (connect + read) + sum(BACKOFF_S)


# A stalled hub (accepts the connection, never answers) ends in `network` (exit 6) within this many
# seconds per hub call with the default timeouts: 3 x (10 + 30) + 0.5 + 1 = 121.5.
STALL_BOUND_S = call_bound(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)


# A file must arrive at MIN_RATE_BPS or better, after FILE_GRACE_S: a hub that trickles (one chunk within each
# read timeout) ends in `network` once the file's deadline, grace + remaining bytes / rate, has passed.
MIN_RATE_BPS = 50_000.0  # 50 kB/s: a 5 GB shard may take up to 28 hours; a trickle of 1 B/s ends after a minute
FILE_GRACE_S = 60.0
MIN_RATE_ENV = "PRESTAGE_HUB_MIN_RATE"  # "BYTES_PER_S" or "BYTES_PER_S,GRACE_S"


def min_rate_from_env() -> tuple[float, float]:
    """(bytes per second, grace seconds) below which a file transfer is given up: PRESTAGE_HUB_MIN_RATE or the
    defaults."""
    raw = os.environ.get(MIN_RATE_ENV, "").strip()
    if not raw:
        return MIN_RATE_BPS, FILE_GRACE_S
    try:
        values = [float(p) for p in raw.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(0 < v < 1e12 for v in values):
        raise errors.UsageError(
            f"{MIN_RATE_ENV}={raw!r}: not a rate in bytes per second (optionally ',GRACE_SECONDS'); use e.g. "
            "50000 or 50000,60, or unset it"
        )
    return (values[0], FILE_GRACE_S) if len(values) == 1 else (values[0], values[1])


def timeouts_from_env() -> tuple[float, float]:
    """(connect, read) seconds: PRESTAGE_HUB_TIMEOUT when set, else the defaults."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return CONNECT_TIMEOUT_S, READ_TIMEOUT_S
    parts = [p.strip() for p in raw.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(0 < v <= 3600 for v in values):
        raise errors.UsageError(
            f"{TIMEOUT_ENV}={raw!r}: not a number of seconds (0 < s <= 3600); use e.g. 30 or 10,30 "
            "(connect,read), or unset it"
        )
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


class HubStopped(Exception):
    """A transfer ended on purpose (Ctrl-C): the partial file stays for the next run to resume."""


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


def retry_after_seconds(headers, now: float | None = None) -> float | None:
    """The wait a `Retry-After` header asks for: delay-seconds or an HTTP date; None when absent or bad."""
    value = None
    for key, v in (headers or {}).items():
        if str(key).lower() == "retry-after":
            value = str(v).strip()
    if not value:
        return None
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _status(e: BaseException) -> int | None:
    return getattr(getattr(e, "response", None), "status_code", None)


def _is_transient(e: BaseException) -> bool:
    from huggingface_hub import errors as hf

    if isinstance(e, (hf.RepositoryNotFoundError, hf.RevisionNotFoundError, hf.EntryNotFoundError)):
        return False
    if isinstance(e, hf.HfHubHTTPError):
        return _status(e) in (408, 429, 500, 502, 503, 504)
    return _is_connection_error(e)


def _is_timeout(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"TimeoutException", "ReadTimeout", "ConnectTimeout", "WriteTimeout", "PoolTimeout"})


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
                if not _is_connection_error(e) and not hasattr(e, "response"):
                    raise
                last = e
            except Exception as e:
                last = e
            finally:
                self._local.deadline = None
            if self._local.progressed:  # bytes arrived before the failure: a fresh set of tries
                attempt, deadline = 1, time.monotonic() + self.bound_s
            if not _is_transient(last):
                raise translate(last, repo_id=repo_id, revision=revision, s=self.s, what=what) from last
            asked = retry_after_seconds(getattr(getattr(last, "response", None), "headers", None))
            if asked is not None and asked > RETRY_AFTER_CAP_S:
                raise errors.NetworkError(
                    f"{where}: hub {self.s.endpoint} answered HTTP {_status(last)} and asks to retry after "
                    f"{asked:.0f} s, more than the {RETRY_AFTER_CAP_S:.0f} s prestage waits; retry later"
                ) from last
            wait = asked if asked is not None else BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1]
            if attempt >= ATTEMPTS or (asked is None and time.monotonic() + wait > deadline):
                raise self._give_up(last, where, attempt, repo_id, revision, what) from last
            if asked is not None:
                deadline += wait  # a wait the hub asked for does not eat the stall budget
            why = f"HTTP {_status(last)}" if _status(last) else type(last).__name__
            self.reporter.info(
                f"hub: {why} from {self.s.endpoint} for {where}; retrying in {wait:.1f} s "
                f"(try {attempt + 1} of {ATTEMPTS})"
            )
            if self.stop.wait(wait):
                raise HubStopped(where)

    def _give_up(self, e, where, attempts, repo_id, revision, what) -> errors.PrestageError:
        if _is_timeout(e):
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
        with guard, _blob_lock(self.s.cache_dir, repo_id, etag):
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
        for item in paths:
            entry = item if isinstance(item, dict) else {"path": item}
            rel = names.repo_path(entry.get("path"), f"{repo_id}@{commit[:12]} listing")
            if any(fnmatch.fnmatchcase(rel, p) for p in pats):
                continue
            if verify_cached(self.s.cache_dir, repo_id, commit, rel, entry) is not None or self.s.offline:
                continue
            self.download(repo_id, rel, commit, expect=entry if isinstance(item, dict) else None)
        snap.mkdir(parents=True, exist_ok=True)
        return snap


_ETAG_LOCKS: dict = {}  # threads of one process
_ETAG_GUARD = threading.Lock()


@contextmanager
def _blob_lock(cache_dir: Path, repo_id: str, etag: str):
    """The blob's lock across processes, where huggingface_hub keeps its own (<cache>/.locks/models--org--name/
    <etag>.lock): two processes never append to one partial file, nor one to a blob the other just finished."""
    from filelock import FileLock

    path = Path(cache_dir) / ".locks" / repo_folder(Path(""), repo_id).name / f"{etag}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield
