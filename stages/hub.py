"""Talking to a Hugging Face hub the way huggingface_hub does, shared by every stage.

- `settings(params)`: endpoint, token (kept secret), cache root and offline mode, from flags and the HF
  environment (HF_ENDPOINT, HF_TOKEN / HUGGING_FACE_HUB_TOKEN / token file, HF_HUB_CACHE / HF_HOME,
  HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE). `--download-dir` replaces the cache root, `--offline` forces offline.
- `prepare_env(s)`: sets the environment huggingface_hub reads at import, before it is imported.
- Cache reads by the documented layout (refs/, snapshots/), with no import of huggingface_hub: the cached
  path of a stage stays fast and makes no network call.
- `translate(e, ...)`: a huggingface_hub / transformers exception as a one-line PrestageError.
- `with_retries(fn)`: bounded retries with backoff for transient hub failures (connection, 5xx, 429).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from prestage.stages import errors
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


def read_ref(cache_dir: Path, repo_id: str, revision: str) -> str | None:
    """The commit a revision points to in the cache (a 40-hex revision is its own commit)."""
    if SHA_RE.match(revision):
        return revision
    try:
        sha = (repo_folder(cache_dir, repo_id) / "refs" / revision).read_text().strip()
    except OSError:
        return None
    return sha if SHA_RE.match(sha) else None


def write_ref(cache_dir: Path, repo_id: str, revision: str, commit: str) -> None:
    if SHA_RE.match(revision) or revision == commit:
        return
    ref = repo_folder(cache_dir, repo_id) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)


def snapshot_rel(repo_id: str, commit: str) -> str:
    """The snapshot folder relative to the cache root, as manifests record it."""
    return f"models--{repo_id.replace('/', '--')}/snapshots/{commit}"


def cached_file(cache_dir: Path, repo_id: str, commit: str, path: str) -> Path | None:
    p = Path(cache_dir) / snapshot_rel(repo_id, commit) / path
    return p if p.is_file() else None


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


def with_retries(fn, *, attempts: int = 3, base_delay: float = 0.5):
    """Call fn(); retry transient failures with exponential backoff, then let the last one propagate."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if i == attempts - 1 or not _is_transient(e):
                raise
            time.sleep(base_delay * (2**i))
