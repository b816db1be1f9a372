"""Where the tokenizer comes from: the model itself, another hub repo, or a local folder.

`locate(run_dir, params, inputs, resolve_manifest)` returns a `TokenizerSource`: the folder holding the
tokenizer files, the hub id and pinned commit (hub only), and the repo listing used to pick the tokenizer
mode. As vLLM does (docs/vllm-rules.md, §4.3), a hub tokenizer is fetched as a non-weight snapshot of the whole
repo (config, tokenizer, chat-template, processor and *.py files) into the run's cache root (stages/paths.py),
where the model's files are. The model's own tokenizer uses resolve's pinned commit; another repo or
revision is pinned here (HfApi.model_info online, the cached ref offline).

`pick_mode(mode, paths)` applies vLLM's auto rule: `mistral` when the repo has consolidated*.safetensors
and tekken.json or tokenizer.model.v*, else `hf`.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from prestage.stages import errors, hub, names
from prestage.stages.paths import model_dir
from prestage.stages.records import ResolveRecord

# vLLM's _WEIGHT_FILE_PATTERNS: what the non-weight snapshot leaves out.
WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.gguf",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.onnx_data",
    "*.png",
    "*.jpg",
    "*.jpeg",
    "*.gif",
    "*.webp",
    "*.mp3",
    "*.mp4",
    "*.wav",
    "*.flac",
    "*.parquet",
    "*.arrow",
    "*.ipynb",
    "*.zip",
    "*.tar*",
)
MODES = ("auto", "hf", "mistral")


@dataclass
class TokenizerSource:
    kind: str  # "model" (the resolved model's own files), "hub" (another repo or revision), "local"
    folder: Path  # absolute folder holding the tokenizer files
    name: str  # what the tokenizer's name_or_path is set back to: the hub id, or the path as typed
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    snapshot: str | None = None  # relative to the HF cache root
    local_dir: str | None = None  # relative to the run folder
    paths: list = field(default_factory=list)  # the repo listing (POSIX, repo-relative)

    def where(self) -> str:
        return f"{self.repo_id}@{self.commit[:12]}" if self.repo_id else str(self.folder)


def normalize_tokenizer_arg(tokenizer: str | None, resolve: ResolveRecord) -> dict:
    """The tokenizer argument as recorded in the inputs: None means the model's own tokenizer."""
    if not tokenizer or tokenizer == resolve.model or tokenizer == resolve.repo_id:
        return {"kind": "model", "value": None}
    p = Path(tokenizer).expanduser()
    try:
        is_dir, exists = p.is_dir(), p.exists()
    except OSError:  # a name too long for the file system (ENAMETOOLONG) is no folder
        is_dir = exists = False
    if is_dir:
        return {"kind": "local", "value": tokenizer}
    if exists:
        raise errors.UsageError(
            f"--tokenizer {tokenizer}: is a file, not a folder; pass a tokenizer folder or a hub id"
        )
    if tokenizer.count("/") > 1 or tokenizer.startswith((".", "/", "~")) or not names.is_repo_id(tokenizer):
        shown = tokenizer if len(tokenizer) <= 120 else tokenizer[:117] + "..."
        raise errors.NotFoundError(f"--tokenizer {shown}: no such folder, and not a hub id (org/name); check the path")
    return {"kind": "hub", "value": tokenizer}


def pick_mode(mode: str, paths: list[str]) -> tuple[str, str]:
    """(mode used, why) following vLLM's auto rule."""
    if mode != "auto":
        return mode, f"--tokenizer-mode {mode}"
    names = [PurePosixPath(p).name for p in paths]
    consolidated = any(fnmatch.fnmatch(n, "consolidated*.safetensors") for n in names)
    mistral_tok = any(n == "tekken.json" or n.startswith("tokenizer.model.v") for n in names)
    if consolidated and mistral_tok:
        return "mistral", "auto: the repo has consolidated*.safetensors and a Mistral tokenizer file"
    return "hf", "auto"


def _walk(folder: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            out.append((Path(root) / f).relative_to(folder).as_posix())
    return sorted(out)


def _pin(client: hub.HubClient, repo_id: str, revision: str) -> tuple[str, list[dict] | None]:
    """(commit, listing or None) for repo@revision: the cached ref offline, the hub's answer online (entries
    {path, size, sha256, blob_id, lfs}, every name checked to stay inside the repo)."""
    s = client.s
    if s.offline:
        commit = hub.read_ref(s.cache_dir, repo_id, revision)
        if commit is None:
            raise errors.OfflineMissError(
                f"{repo_id}@{revision} (tokenizer): revision not in the cache "
                f"{s.cache_dir} and offline mode is on; run once online to fetch it"
            )
        return commit, None
    info = client.repo_info(repo_id, revision, files_metadata=True, what="tokenizer")
    hub.write_ref(s.cache_dir, repo_id, revision, info.sha)
    entries = []
    for x in info.siblings or []:
        lfs = getattr(x, "lfs", None)
        entries.append(
            {
                "path": names.repo_path(x.rfilename, f"{repo_id}@{revision} listing"),
                "size": x.size,
                "sha256": getattr(lfs, "sha256", None) if lfs else None,
                "lfs": lfs is not None,
                "blob_id": getattr(x, "blob_id", None),
            }
        )
    return info.sha, sorted(entries, key=lambda e: e["path"])


def _snapshot(client: hub.HubClient, repo_id: str, commit: str, entries: list[dict] | None) -> Path:
    """Download the non-weight files of repo@commit into the cache, each checked against the listing (a
    cached copy too); the snapshot folder."""
    if entries is None:  # offline: what the cache holds
        return client.snapshot(repo_id, commit, [], what="tokenizer files")
    return client.snapshot(repo_id, commit, entries, ignore_patterns=WEIGHT_PATTERNS, what="tokenizer files")


def locate(run_dir: Path, params: dict, inputs: dict, resolve_manifest, reporter=None) -> TokenizerSource:
    """Find, pin and (for hub repos) download the tokenizer's files; see the module docstring."""
    # The tokenizer goes where the model's files go: the run's cache root (stages/paths.py). vLLM puts it in
    # HF_HUB_CACHE even under --download-dir; prestage keeps one cache per run so a copied run is whole.
    resolve = resolve_manifest.record
    s = hub.settings(params)
    hub.prepare_env(s)
    client = hub.HubClient(s, reporter)
    tok = inputs["tokenizer"]
    revision = inputs["tokenizer_revision"] or resolve.revision or "main"

    if tok["kind"] == "local":
        folder = (Path(run_dir) / tok["local_dir"]).resolve()
        if not folder.is_dir():
            raise errors.NotFoundError(
                f"--tokenizer {tok['value']}: the folder is gone ({folder}); pass an existing tokenizer folder"
            )
        return TokenizerSource(
            kind="local", folder=folder, name=tok["value"], local_dir=tok["local_dir"], paths=_walk(folder)
        )
    if tok["kind"] == "model" and resolve.source == "local":
        folder = model_dir(run_dir, resolve_manifest, params)
        return TokenizerSource(
            kind="model", folder=folder, name=resolve.model, local_dir=resolve.local_dir, paths=_walk(folder)
        )

    repo_id = resolve.repo_id if tok["kind"] == "model" else tok["value"]
    same_pin = tok["kind"] == "model" and revision in (resolve.revision, resolve.commit)
    if same_pin:
        commit, entries = resolve.commit, [f.to_dict() for f in resolve.files]
    else:
        commit, entries = _pin(client, repo_id, revision)
    folder = _snapshot(client, repo_id, commit, entries)
    # offline, another repo: what the cached snapshot holds
    paths = _walk(folder) if entries is None else [e["path"] for e in entries]
    return TokenizerSource(
        kind="model" if same_pin else "hub",
        folder=folder,
        name=repo_id,
        repo_id=repo_id,
        revision=revision,
        commit=commit,
        snapshot=hub.snapshot_rel(repo_id, commit),
        paths=paths,
    )
