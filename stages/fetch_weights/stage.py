"""The fetch-weights stage: pick the weight files vLLM would load, get them into the cache, verify them.

Flow (hub): take resolve's full listing (no new listing call), read the format's index JSON when one
applies (downloaded first: it is small), select the files (select.py; an empty selection fails here, before
any download), then under the model's download lock: check disk space for the bytes still missing, download
the rest in parallel at the pinned commit, and hash and parse every file as soon as it is there. Flow
(local): the same selection over the local folder, no download. Then the tensor index is checked against
configure's spec. `dummy` downloads nothing and records the parameters launch will fill; `npcache` converts
the `.bin` files into `np/` in the run folder.
"""

from __future__ import annotations

from pathlib import Path

from prestage.stages import paths
from prestage.stages.base import Context, Stage, StageResult, opt
from prestage.stages.errors import UsageError
from prestage.stages.fetch_weights import selection as sel
from prestage.stages.manifest import Manifest
from prestage.stages.records import record_of

_HELP_FORMATS = ", ".join(sel.LOAD_FORMATS)


class FetchWeightsStage(Stage):
    name = "fetch-weights"
    version = 2  # 2: typed record; --download-dir is no input
    requires = ("resolve", "configure")
    options = (
        opt(
            "--load-format",
            default="auto",
            show_default=True,
            help=f"Which weight files to load, as vLLM's flag: {_HELP_FORMATS}",
        ),
        opt(
            "--download-dir",
            default=None,
            help="Cache root for downloads instead of HF_HUB_CACHE (as vLLM's --download-dir)",
        ),
        opt(
            "--ignore-patterns",
            multiple=True,
            default=sel.DEFAULT_IGNORE,
            show_default=True,
            help="Glob of repo paths never downloaded or loaded (repeatable)",
        ),
        opt(
            "--offline", is_flag=True, default=False, help="Use only the local cache, no network (as HF_HUB_OFFLINE=1)"
        ),
        opt("--max-workers", type=int, default=8, show_default=True, help="Files downloaded and hashed at once"),
    )

    def check_params(self, params: dict) -> None:
        sel.normalize_load_format(params.get("load_format"))
        workers = params.get("max_workers")
        if workers is not None and int(workers) < 1:
            raise UsageError(f"--max-workers {workers}: must be at least 1")

    def inputs(self, params: dict, upstream: dict) -> dict:
        patterns = params.get("ignore_patterns")
        patterns = list(patterns) if patterns else list(sel.DEFAULT_IGNORE)
        # --download-dir says where, not what: it is no input (stages/paths.py finds the cache root)
        return {"load_format": sel.normalize_load_format(params.get("load_format")), "ignore_patterns": patterns}

    def run(self, ctx: Context, inputs: dict) -> StageResult:
        from prestage.stages.fetch_weights.fetch import fetch

        return fetch(ctx, inputs)

    def check_outputs(self, run_dir: Path, manifest: Manifest, params: dict | None = None) -> str | None:
        rec = record_of(manifest)
        if rec.format == "dummy":
            return None
        base = paths.weights_dir(run_dir, manifest, params=params)
        for f in rec.files:
            p = paths.inside(base, f.path, "fetch-weights file")
            if not p.is_file():
                return f"{f.path} is gone from {base}"
            if p.stat().st_size != f.size:
                return f"{f.path} has {p.stat().st_size} bytes, the manifest recorded {f.size}"
        for f in rec.npcache.files if rec.npcache else []:
            p = paths.in_run(run_dir, f.path, "npcache file")
            if not p.is_file() or p.stat().st_size != f.size:
                return f"npcache file {f.path} is missing or changed"
        return None


__all__ = ["FetchWeightsStage"]
