"""Where a run's files live: the one authority that every stage, the runner, verify and launch ask.

Manifests hold no absolute path. They record where a file is relative to one of two roots:

    the run folder     artifacts/<run>/: manifests, the stored tokenizer, npcache files; a local model's
                       folder is recorded relative to it too
    the cache root     a Hugging Face cache (hub/ layout): the model's snapshot, blobs and refs

The cache root is decided here, from the current flags and environment first, so that a run folder and a
cache copied to another machine work there:

    1. `--download-dir DIR` given now: DIR.
    2. Otherwise the first of these that holds the resolved model's config file: the cache the environment
       names explicitly (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE or HF_HOME set), the cache root resolve used
       (kept in resolve's `volatile` section as a hint: a host path, never part of a decision), then the
       default cache (~/.cache/huggingface/hub).
    3. None holds it yet: the one resolve used when that folder still exists, else the environment's.

So `prestage resolve M --download-dir A` is followed by later stages in A without repeating the flag, and a
run moved with its cache to B is found in B with `HF_HUB_CACHE=B` (or `--download-dir B`).

Importable without torch, transformers or huggingface_hub.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from prestage.stages import errors, hub


def inside(
    root: Path,
    rel: str,
    what: str,
    *,
    error: type[errors.PrestageError] | None = None,
    fix: str = "the manifest was edited: delete it and re-run",
    follow_links: bool = False,
) -> Path:
    """`root / rel`, refusing a path that is absolute, climbs out of `root` or is empty (an edited manifest
    by default: BadManifestError; `error` and `fix` for a name from elsewhere). `follow_links`: also refuse a
    path whose existing part resolves (through symlinks) outside `root`."""
    p = PurePosixPath(str(rel))
    bad = p.is_absolute() or ".." in p.parts or not str(rel) or "\\" in str(rel) or "\0" in str(rel)
    out = Path(root) / p
    if not bad and follow_links:
        base = Path(root).resolve()
        bad = not out.resolve().is_relative_to(base)
    if bad:
        raise (error or errors.BadManifestError)(f"{what}: path {str(rel)[:200]!r} is not inside {root}; {fix}")
    return out


def cache_root(params: dict | None, resolve=None) -> Path:
    """The Hugging Face cache root for this run (see the module docstring for the order)."""
    params = params or {}
    if params.get("cache_dir"):  # already decided for this command (runner.chain.stage_params)
        return Path(params["cache_dir"])
    if params.get("download_dir"):
        return Path(params["download_dir"]).expanduser().absolute()
    env = hub.default_cache_dir().absolute()
    if resolve is None:
        return env
    hint = (resolve.volatile or {}).get("cache_dir")
    hinted = [Path(hint)] if isinstance(hint, str) and hint else []
    named = any(os.environ.get(v) for v in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"))
    # an explicitly named cache that holds the model wins over the hint; the default one does not
    candidates = [env, *hinted] if named else [*hinted, env]
    rec = resolve.record if resolve.record is not None else None
    outputs = resolve.outputs if rec is None else rec.to_dict()
    snapshot, config_file = outputs.get("snapshot"), outputs.get("config_file")
    if isinstance(snapshot, str) and isinstance(config_file, str):
        for root in candidates:
            if (root / snapshot / config_file).is_file():
                return root
    for root in hinted:
        if root.is_dir():
            return root
    return env


def model_dir(run_dir: Path, resolve, params: dict | None = None) -> Path:
    """The absolute folder holding the resolved model: the local folder, or the snapshot in the cache root."""
    from prestage.stages.records import record_of

    rec = record_of(resolve)
    if rec.source == "local":
        return (Path(run_dir) / rec.local_dir).resolve()
    return inside(cache_root(params, resolve), rec.snapshot, "resolve snapshot")


def weights_dir(run_dir: Path, weights, resolve=None, params: dict | None = None) -> Path:
    """The absolute folder fetch-weights' recorded files are relative to (`weights`: its manifest)."""
    from prestage.stages.records import record_of

    rec = record_of(weights)
    if rec.root == "local":
        return (Path(run_dir) / rec.folder).resolve()
    return inside(cache_root(params, resolve), rec.folder, "fetch-weights folder")


def in_run(run_dir: Path, rel: str, what: str) -> Path:
    """A file a stage wrote into the run folder (stored tokenizer, npcache), checked to stay inside it."""
    return inside(Path(run_dir), rel, what)
