"""The resolve stage: find the model, pin its revision, record its file listing (the first thing `vllm serve` does).

An existing local folder is used as it is: it must hold config.json, or a Mistral params.json beside
consolidated*.safetensors. A hub id is looked up in the Hugging Face cache at `--revision` first; only
when the cache cannot answer is the hub asked, once for the repo info (commit + listing with sizes and
LFS sha256) and once for config.json. The listing is kept under `<cache>/.prestage/listings/`, so a later
resolve of the same commit needs no network at all. `--offline` / HF_HUB_OFFLINE=1 never touches the
network: cache or a clear error.
"""

from __future__ import annotations

import os
from pathlib import Path

from prestage.stages import errors, hub, names, paths
from prestage.stages.base import Context, Stage, StageResult, opt
from prestage.stages.digest import sha256_hex
from prestage.stages.manifest import Manifest
from prestage.stages.records import record_of
from prestage.stages.resolve.lookup import is_local, resolve_hub, resolve_local

_CONFIG_FORMATS = ("auto", "hf", "mistral")

OPTIONS = (
    opt(
        "--revision",
        default=None,
        metavar="REV",
        help="Branch, tag or commit of the model on the hub (default: main); pinned to a commit.",
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
        return None
