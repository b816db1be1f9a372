"""Talking to a Hugging Face hub the way huggingface_hub does, shared by every stage (settings.py, cache.py,
failures.py, client.py; every name is re-exported here: `from prestage.stages import hub; hub.HubClient`).

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

from prestage.stages.hub.cache import (  # noqa: F401
    cached_file,
    content_id,
    expected_id,
    git_blob_id,
    read_ref,
    ref_path,
    ref_time,
    remove_cached,
    repo_folder,
    snapshot_rel,
    verify_cached,
    write_ref,
)
from prestage.stages.hub.client import (  # noqa: F401
    HubClient,
)
from prestage.stages.hub.failures import (  # noqa: F401
    HubStopped,
    is_connection_error,
    is_timeout,
    is_transient,
    retry_after_seconds,
    status_of,
    translate,
)
from prestage.stages.hub.settings import (  # noqa: F401
    ATTEMPTS,
    BACKOFF_S,
    CONNECT_TIMEOUT_S,
    DEFAULT_ENDPOINT,
    FILE_GRACE_S,
    MIN_RATE_BPS,
    MIN_RATE_ENV,
    OPTIONS,
    READ_TIMEOUT_S,
    RETRY_AFTER_CAP_S,
    SHA_RE,
    STALL_BOUND_S,
    TIMEOUT_ENV,
    HubSettings,
    call_bound,
    default_cache_dir,
    env_true,
    min_rate_from_env,
    prepare_env,
    settings,
    timeouts_from_env,
)
