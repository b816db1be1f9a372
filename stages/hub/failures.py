"""What a failed hub call means: `translate(e, ...)` turns a huggingface_hub / transformers exception into one
PrestageError line naming the repo and revision; `is_transient` / `is_timeout` / `is_connection_error` decide
the retry policy, `retry_after_seconds` reads a Retry-After header; `HubStopped` ends a transfer on purpose."""

from __future__ import annotations

import re
import time
from email.utils import parsedate_to_datetime

from prestage.stages import errors
from prestage.stages.hub.settings import HubSettings


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
    if is_connection_error(err):
        return errors.NetworkError(
            f"{where}: hub {s.endpoint} unreachable ({type(err).__name__}); check the "
            "network or HF_ENDPOINT, or use --offline with a filled cache"
        )
    return errors.PrestageError(f"{where}: {type(err).__name__}: {err}")


def is_connection_error(e: BaseException) -> bool:
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


class HubStopped(Exception):
    """A transfer ended on purpose (Ctrl-C): the partial file stays for the next run to resume."""


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


def status_of(e: BaseException) -> int | None:
    return getattr(getattr(e, "response", None), "status_code", None)


def is_transient(e: BaseException) -> bool:
    from huggingface_hub import errors as hf

    if isinstance(e, (hf.RepositoryNotFoundError, hf.RevisionNotFoundError, hf.EntryNotFoundError)):
        return False
    if isinstance(e, hf.HfHubHTTPError):
        return status_of(e) in (408, 429, 500, 502, 503, 504)
    return is_connection_error(e)


def is_timeout(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"TimeoutException", "ReadTimeout", "ConnectTimeout", "WriteTimeout", "PoolTimeout"})
