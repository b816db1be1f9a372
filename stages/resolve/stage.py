"""The resolve stage: find the model, pin its revision, record its file listing (the first thing `vllm serve` does).

An existing local folder is used as it is: it must hold config.json, or a Mistral params.json beside
consolidated*.safetensors. A hub id is looked up in the Hugging Face cache at `--revision` first (vLLM's
cache-first rule: a branch already in the cache is used without asking the hub, and resolve says so with
the date the cache learnt it); only when the cache cannot answer, or with `--refresh` / `--force`, is the
hub asked, once for the repo info (commit + listing with sizes and LFS sha256) and once for config.json.
A 40-hex revision is its own commit and never asks which commit it is. The listing is kept under
`<cache>/.prestage/listings/`, so a later resolve of the same commit needs no network at all.
`--offline` / HF_HUB_OFFLINE=1 never touches the network: cache or a clear error.
"""

from __future__ import annotations

import os
from pathlib import Path

from prestage.stages import errors, hub, names, paths
from prestage.stages.base import Context, Stage, StageResult, opt
from prestage.stages.digest import sha256_hex
from prestage.stages.manifest import Manifest
from prestage.stages.records import record_of
from prestage.stages.resolve.lookup import from_cache_note, is_local, offline_reason, resolve_hub, resolve_local

_CONFIG_FORMATS = ("auto", "hf", "mistral")

OPTIONS = (
    opt(
        "--revision",
        default=None,
        metavar="REV",
        help="Branch, tag or commit of the model on the hub (default: main); pinned to a commit.",
    ),
    opt(
        "--refresh",
        is_flag=True,
        default=False,
        help="Ask the hub for the branch's current commit instead of using the one in the cache (as `hf "
        "download` does); the later stages follow a new commit. --force does the same.",
    ),
    opt(
        "--config-format",
        type=str,
        default="auto",
        metavar="auto|hf|mistral",
        help="Config format: hf (config.json), mistral (params.json), or auto-detect (default).",
    ),
)


class ResolveStage(Stage):
    name = "resolve"
    # 2: typed record; `listing` replaces `listing_source`; no cache path, endpoint or token input
    # 3: each listed file's git blob id (`blob_id`), so non-LFS files are checked too
    version = 3
    options = OPTIONS

    def check_params(self, params: dict) -> None:
        if params.get("revision") is not None:
            names.revision(params["revision"])
        if params.get("refresh") and not hub.SHA_RE.match(params.get("revision") or "main"):
            why = offline_reason(params)
            if why:
                raise errors.OfflineMissError(
                    f"--refresh asks the hub for the current commit of '{params.get('revision') or 'main'}', "
                    f"but offline mode is on ({why}); drop --refresh to use the cached commit, or go online"
                )

    def inputs(self, params: dict, upstream: dict[str, Manifest]) -> dict:
        model = params.get("model")
        if not model:
            raise errors.UsageError("no model given; pass a hub id (org/name) or a local folder")
        fmt = (params.get("config_format") or "auto").lower()
        if fmt not in _CONFIG_FORMATS:
            raise errors.UsageError(f"unknown --config-format '{fmt}'; use one of {', '.join(_CONFIG_FORMATS)}")
        if is_local(model):
            path = Path(model).expanduser().resolve()
            if not path.is_dir():
                raise errors.UsageError(f"{model}: is a file, not a model folder; pass the folder holding config.json")
            run_dir = Path(params["run_dir"]).resolve()
            return {
                "model": model,
                "source": "local",
                "local_dir": os.path.relpath(path, run_dir),
                "config_format": fmt,
            }
        # Where the cache is, the endpoint and the token decide nothing once the revision is pinned, so none
        # of them is an input: a run moved to another machine (another cache, no endpoint) stays fresh.
        return {
            "model": model,
            "source": "hub",
            "repo_id": model,
            "revision": names.revision(params.get("revision") or "main"),
            "config_format": fmt,
        }

    def run(self, ctx: Context, inputs: dict) -> StageResult:
        if inputs["source"] == "local":
            return resolve_local(ctx, inputs)
        return resolve_hub(ctx, inputs)

    # ---- local folder ----------------------------------------------------------------------------
    def cached_note(self, run_dir: Path, manifest: Manifest, params: dict | None = None) -> str | None:
        """For a branch or tag: which commit the cached manifest holds, and that the hub was not asked."""
        rec = record_of(manifest)
        if rec.source != "hub" or hub.SHA_RE.match(rec.revision):
            return None
        cache = paths.cache_root(params, manifest)
        when = None
        if hub.read_ref(cache, rec.repo_id, rec.revision) == rec.commit:
            when = hub.ref_time(cache, rec.repo_id, rec.revision)
        return from_cache_note(rec.revision, rec.commit, when, manifest.volatile.get("started_at"))

    def check_outputs(self, run_dir: Path, manifest: Manifest, params: dict | None = None) -> str | None:
        rec = record_of(manifest)
        if rec.source == "local":
            path = Path(run_dir) / rec.local_dir / rec.config_file
            if not path.is_file():
                return f"{rec.config_file} is gone from {rec.local_dir}"
            return None if sha256_hex(path) == rec.config_sha256 else f"{rec.config_file} changed"
        cache = paths.cache_root(params, manifest)
        if hub.cached_file(cache, rec.repo_id, rec.commit, rec.config_file) is None:
            return f"{rec.config_file} of {rec.repo_id}@{rec.commit[:12]} is no longer in the cache {cache}"
        now = hub.read_ref(cache, rec.repo_id, rec.revision)
        if now is not None and now != rec.commit:  # another resolve or `hf download` moved the branch
            return f"{rec.revision} now points to {now[:12]} in the cache (this run has {rec.commit[:12]})"
        return None
