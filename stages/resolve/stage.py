"""The resolve stage: find the model, pin its revision, record its file listing (vLLM's first step).

An existing local folder is used as it is: it must hold config.json, or a Mistral params.json beside
consolidated*.safetensors. A hub id is looked up in the Hugging Face cache at `--revision` first; only
when the cache cannot answer is the hub asked, once for the repo info (commit + listing with sizes and
LFS sha256) and once for config.json. The listing is kept under `<cache>/.prestage/listings/`, so a later
resolve of the same commit needs no network at all. `--offline` / HF_HUB_OFFLINE=1 never touches the
network: cache or a clear error.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from prestage.stages import errors, hub
from prestage.stages.base import Context, Stage, StageResult, opt
from prestage.stages.digest import sha256_hex
from prestage.stages.manifest import Manifest, write_atomic

# huggingface_hub's repo-id rule: "name" or "namespace/name", no "--" or "..", not ending in ".git".
_REPO_ID_RE = re.compile(r"^(?:[\w\-.]{1,96}/)?[\w\-.]{1,96}$")
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


def is_local(model: str) -> bool:
    return Path(model).expanduser().exists()


def detect_format(requested: str, paths: set[str], where: str) -> tuple[str, str]:
    """(config_format, config_file) from the repo's file paths, as vLLM's `get_config` decides it."""
    has_consolidated = any(re.fullmatch(r"consolidated.*\.safetensors", p.rsplit("/", 1)[-1]) for p in paths)
    if requested == "mistral":
        if "params.json" not in paths:
            raise errors.NotFoundError(
                f"{where}: --config-format mistral but there is no params.json; use --config-format hf or auto"
            )
        return "mistral", "params.json"
    if requested == "auto" and has_consolidated and "params.json" in paths:
        return "mistral", "params.json"
    if "config.json" in paths:
        return "hf", "config.json"
    found = ", ".join(sorted(p for p in paths if "/" not in p)[:8]) or "no files"
    raise errors.NotFoundError(
        f"{where}: no config.json (nor a Mistral params.json beside "
        f"consolidated*.safetensors); found {found}; point at a model folder or repo"
    )


def _listing_path(cache_dir: Path, repo_id: str, commit: str) -> Path:
    return Path(cache_dir) / ".prestage" / "listings" / ("models--" + repo_id.replace("/", "--")) / f"{commit}.json"


class ResolveStage(Stage):
    name = "resolve"
    version = 1
    options = OPTIONS

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
        s = hub.settings(params)
        ddir = params.get("download_dir")
        return {
            "model": model,
            "source": "hub",
            "repo_id": model,
            "revision": params.get("revision") or "main",
            "endpoint": s.endpoint,
            "token": s.token_state,
            "config_format": fmt,
            # later stages inherit it (prestage.runner.chain.stage_params), so it is an input, kept absolute
            "download_dir": str(Path(ddir).expanduser().absolute()) if ddir else None,
        }

    def run(self, ctx: Context, inputs: dict) -> StageResult:
        if inputs["source"] == "local":
            return self._run_local(ctx, inputs)
        return self._run_hub(ctx, inputs)

    # ---- local folder ----------------------------------------------------------------------------
    def _run_local(self, ctx: Context, inputs: dict) -> StageResult:
        folder = (ctx.run_dir / inputs["local_dir"]).resolve()
        files = []
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder).as_posix()
            if p.is_file() and not any(part.startswith(".") for part in rel.split("/")):
                files.append({"path": rel, "size": p.stat().st_size, "sha256": None, "lfs": False})
        fmt, cfg = detect_format(inputs["config_format"], {f["path"] for f in files}, inputs["model"])
        outputs = {
            "source": "local",
            "model": inputs["model"],
            "repo_id": None,
            "revision": None,
            "commit": None,
            "local_dir": inputs["local_dir"],
            "snapshot": None,
            "config_format": fmt,
            "config_file": cfg,
            "config_sha256": sha256_hex(folder / cfg),
            "files": files,
            "listing_source": "local",
        }
        return StageResult(outputs=outputs, volatile={"model_dir": str(folder)})

    # ---- hub id ----------------------------------------------------------------------------------
    def _run_hub(self, ctx: Context, inputs: dict) -> StageResult:
        repo, rev = inputs["repo_id"], inputs["revision"]
        where = f"{repo}@{rev}"
        if not _REPO_ID_RE.match(repo) or "--" in repo or ".." in repo or repo.endswith(".git"):
            raise errors.NotFoundError(
                f"{repo}: not a local folder and not a valid hub id (org/name); check the path or the id"
            )
        s = hub.settings(ctx.params)
        warnings: list[str] = []
        commit = hub.read_ref(s.cache_dir, repo, rev)
        listing = self._cached_listing(s.cache_dir, repo, commit) if commit else None
        source = "cache"
        if listing is None and s.offline:
            if commit is None:
                raise errors.OfflineMissError(
                    f"{where}: offline and revision '{rev}' is not in the cache "
                    f"{s.cache_dir}; run once online to fetch it"
                )
            listing = self._snapshot_listing(s.cache_dir, repo, commit)
            source = "snapshot"
            warnings.append(
                "offline: the file listing was read off the cached snapshot (no sizes or sha256 "
                "for files not downloaded yet); resolve online once for the full listing"
            )
        if listing is None:
            commit, listing = self._hub_listing(s, repo, rev)
            source = "hub"
        fmt, cfg = detect_format(inputs["config_format"], {f["path"] for f in listing}, where)
        path = hub.cached_file(s.cache_dir, repo, commit, cfg)
        if path is None:
            if s.offline:
                raise errors.OfflineMissError(
                    f"{where}: {cfg} is not in the cache {s.cache_dir} and offline "
                    "mode is on; run once online to fetch it"
                )
            path = self._download(s, repo, rev, commit, cfg)
        hub.write_ref(s.cache_dir, repo, rev, commit)
        if source == "hub":
            lp = _listing_path(s.cache_dir, repo, commit)
            write_atomic(lp, json.dumps(listing, sort_keys=True).encode())
        outputs = {
            "source": "hub",
            "model": inputs["model"],
            "repo_id": repo,
            "revision": rev,
            "commit": commit,
            "local_dir": None,
            "snapshot": hub.snapshot_rel(repo, commit),
            "config_format": fmt,
            "config_file": cfg,
            "config_sha256": sha256_hex(path),
            "files": listing,
            "listing_source": source,
        }
        return StageResult(
            outputs=outputs, warnings=warnings, volatile={"cache_dir": str(s.cache_dir), "offline": s.offline}
        )

    @staticmethod
    def _cached_listing(cache_dir: Path, repo: str, commit: str) -> list | None:
        try:
            data = json.loads(_listing_path(cache_dir, repo, commit).read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(data, list) and all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in data)
        return data if ok else None

    @staticmethod
    def _snapshot_listing(cache_dir: Path, repo: str, commit: str) -> list:
        snap = Path(cache_dir) / hub.snapshot_rel(repo, commit)
        files = []
        for p in sorted(snap.rglob("*")):
            if p.is_file():
                blob = p.resolve().name
                sha = blob if re.fullmatch(r"[0-9a-f]{64}", blob) else None
                files.append(
                    {
                        "path": p.relative_to(snap).as_posix(),
                        "size": p.stat().st_size,
                        "sha256": sha,
                        "lfs": sha is not None,
                    }
                )
        return files

    @staticmethod
    def _hub_listing(s: hub.HubSettings, repo: str, rev: str) -> tuple[str, list]:
        hub.prepare_env(s)
        from huggingface_hub import HfApi

        api = HfApi(endpoint=s.endpoint, token=s.token or False)
        try:
            info = hub.with_retries(lambda: api.model_info(repo, revision=rev, files_metadata=True))
        except Exception as e:
            raise hub.translate(e, repo_id=repo, revision=rev, s=s) from e
        files = []
        for sib in info.siblings or []:
            lfs = getattr(sib, "lfs", None)
            files.append(
                {
                    "path": sib.rfilename,
                    "size": sib.size,
                    "sha256": getattr(lfs, "sha256", None) if lfs else None,
                    "lfs": lfs is not None,
                }
            )
        files.sort(key=lambda f: f["path"])
        if not isinstance(info.sha, str) or not hub.SHA_RE.match(info.sha):
            raise errors.NetworkError(
                f"{repo}@{rev}: the hub did not give a commit for this revision; check HF_ENDPOINT"
            )
        return info.sha, files

    @staticmethod
    def _download(s: hub.HubSettings, repo: str, rev: str, commit: str, filename: str) -> Path:
        hub.prepare_env(s)
        from huggingface_hub import hf_hub_download

        try:
            return Path(
                hub.with_retries(
                    lambda: hf_hub_download(
                        repo, filename, revision=commit, cache_dir=s.cache_dir, token=s.token or False
                    )
                )
            )
        except Exception as e:
            raise hub.translate(e, repo_id=repo, revision=rev, s=s, what=filename) from e

    def check_outputs(self, run_dir: Path, manifest: Manifest) -> str | None:
        out = manifest.outputs
        if out["source"] == "local":
            path = Path(run_dir) / out["local_dir"] / out["config_file"]
            if not path.is_file():
                return f"{out['config_file']} is gone from {out['local_dir']}"
            return None if sha256_hex(path) == out["config_sha256"] else f"{out['config_file']} changed"
        # The cache root this manifest was written against (volatile: it is a host path).
        cache = Path(manifest.volatile.get("cache_dir") or hub.default_cache_dir())
        if hub.cached_file(cache, out["repo_id"], out["commit"], out["config_file"]) is None:
            return f"{out['config_file']} of {out['repo_id']}@{out['commit'][:12]} is no longer in the cache {cache}"
        return None
