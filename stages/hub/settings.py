"""How prestage talks to a hub, as settings: the hub flags every stage takes, the endpoint, token (kept
secret), cache root and offline mode from flags and the HF environment (HF_ENDPOINT, HF_TOKEN /
HUGGING_FACE_HUB_TOKEN / token file, HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), the
environment huggingface_hub reads at import (`prepare_env`), and the client's timeouts, retries and minimum
transfer rate (with their PRESTAGE_HUB_* overrides and the stall bound they give)."""

from __future__ import annotations

import os
import re
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
