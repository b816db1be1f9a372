"""Which weight files a load format picks from a repo listing: vLLM's `_prepare_weights` rules, as pure code.

Input is the repo listing resolve recorded (every path, recursive) and, for safetensors formats, the parsed
index JSON when the repo has one. Output is a `Selection`: the format actually used, the files to load in
load order, the index used, and the files left out with the reason. Nothing here touches the network or
the disk, so the same rules serve hub repos (before anything is downloaded) and local folders.

The rules (docs/vllm-rules.md, §5.1-5.4):
- `auto` is `mistral` when any file's basename matches `consolidated*.safetensors` (whole listing, before
  ignore patterns, as vLLM's listing check), else `hf`.
- patterns per format, tried in order against top-level files only; the first pattern with a match wins:
  hf `*.safetensors, *.bin, *.pt`; safetensors `*.safetensors`; mistral `consolidated*.safetensors`;
  pt `*.pt, *.pt`; npcache `*.bin, *.pt`.
- safetensors chosen: when the format's index (`model.safetensors.index.json`, or
  `consolidated.safetensors.index.json` for mistral) exists, keep only the files its `weight_map` names;
  a file it names that is absent is an error.
- `.bin`/`.pt` chosen: drop training leftovers (`training_args.bin`, `optimizer.bin`, `optimizer.pt`,
  `scheduler.pt`, `scaler.pt`).
- `--ignore-patterns` (default `original/**/*`) removes matching paths first.
- nothing left: UnsupportedError naming the format, what it looks for and the files that do exist.

One deliberate difference from vLLM: vLLM downloads every file its winning pattern matches (including
`training_args.bin`, `optimizer.bin`, subfolder files) and then drops some when loading; prestage
downloads only the files it will load (plus the index), and lists the rest under `skipped`.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from prestage.stages import names
from prestage.stages.errors import InvalidModelError, UnsupportedError, UsageError

LOAD_FORMATS = ("auto", "hf", "safetensors", "pt", "mistral", "npcache", "dummy")
DEFAULT_IGNORE = ("original/**/*",)
SAFE_INDEX = "model.safetensors.index.json"
MISTRAL_INDEX = "consolidated.safetensors.index.json"
_PATTERNS = {
    "hf": ("*.safetensors", "*.bin", "*.pt"),
    "safetensors": ("*.safetensors",),
    "mistral": ("consolidated*.safetensors",),
    "pt": ("*.pt", "*.pt"),
    "npcache": ("*.bin", "*.pt"),
}
_NOT_FOR_INFERENCE = ("training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")


@dataclass
class Selection:
    load_format: str  # as asked, lower-cased
    format: str  # used: safetensors | pt | mistral | npcache | dummy
    pattern: str | None  # the pattern that matched
    files: list[str]  # repo-relative paths, load order
    index: str | None = None  # repo-relative index file used to narrow the files
    skipped: list[dict] = field(default_factory=list)  # [{path, why}] matched but not loaded


def normalize_load_format(value: str | None) -> str:
    fmt = (value or "auto").strip().lower()
    if fmt not in LOAD_FORMATS:
        raise UsageError(f"--load-format {value!r}: not a load format; use one of {', '.join(LOAD_FORMATS)}")
    return fmt


def natural_key(path: str) -> list:
    """Sort key on the basename with digit runs compared as numbers (model-2 < model-10)."""
    base = path.rsplit("/", 1)[-1]
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", base)]


def _ignored(path: str, patterns) -> bool:
    """huggingface_hub's `ignore_patterns` rule: case-sensitive fnmatch on the repo path ("*" crosses "/"),
    a pattern ending in "/" means everything under it. So the default `original/**/*` drops
    `original/x/y` but not `original/params.json`; neither is ever selected (selection is top-level only)."""
    norm = [p.replace("\\", "/") for p in patterns]
    return any(fnmatch.fnmatchcase(path, p + "*" if p.endswith("/") else p) for p in norm)


def resolve_format(load_format: str, paths) -> str:
    """`auto` → mistral when any basename matches consolidated*.safetensors (recursive), else hf."""
    if load_format != "auto":
        return load_format
    if any(fnmatch.fnmatch(p.rsplit("/", 1)[-1], "consolidated*.safetensors") for p in paths):
        return "mistral"
    return "hf"


def index_name(fmt: str) -> str:
    return MISTRAL_INDEX if fmt == "mistral" else SAFE_INDEX


def index_needed(load_format: str, paths, ignore_patterns=DEFAULT_IGNORE) -> str | None:
    """The index file to read before selecting, when the chosen files may be safetensors and it exists."""
    fmt = resolve_format(load_format, paths)
    if fmt in ("dummy", "pt", "npcache"):
        return None
    top = {p for p in paths if "/" not in p and not _ignored(p, ignore_patterns)}
    pattern = _first_match(fmt, sorted(top))[0]
    name = index_name(fmt)
    return name if pattern and pattern.endswith(".safetensors") and name in top else None


def _first_match(fmt: str, top: list[str]) -> tuple[str | None, list[str]]:
    for pattern in _PATTERNS[fmt]:
        matched = fnmatch.filter(top, pattern)
        if matched:
            return pattern, matched
    return None, []


def usable_formats(paths, ignore_patterns=DEFAULT_IGNORE) -> list[str]:
    """Load formats that would find weights in this listing (for error hints)."""
    kept = [p for p in paths if not _ignored(p, ignore_patterns)]
    top = sorted(p for p in kept if "/" not in p)
    out = []
    for fmt in ("safetensors", "mistral", "hf", "pt"):
        pattern, matched = _first_match(fmt, top)
        if pattern and not pattern.endswith(".safetensors"):
            matched = [m for m in matched if not m.endswith(_NOT_FOR_INFERENCE)]
        if matched:
            out.append(fmt)
    return out


def select(
    load_format: str, paths, *, index: dict | None = None, ignore_patterns=DEFAULT_IGNORE, model: str = "the model"
) -> Selection:
    """Pick the files to load. `index` is the parsed index JSON named by `index_needed()`, if any."""
    asked = normalize_load_format(load_format)
    paths = sorted(set(paths))
    fmt = resolve_format(asked, paths)
    if fmt == "dummy":
        return Selection(asked, "dummy", None, [])
    kept = [p for p in paths if not _ignored(p, ignore_patterns)]
    top = sorted(p for p in kept if "/" not in p)
    pattern, matched = _first_match(fmt, top)
    skipped: list[dict] = []
    used_index = None
    if pattern and pattern.endswith(".safetensors"):
        used = "mistral" if fmt == "mistral" else "safetensors"
        name = index_name(fmt)
        if index is not None and name in top:
            if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
                raise InvalidModelError(f"{model}: {name} has no 'weight_map' object; fix or remove the index file")
            for v in index["weight_map"].values():  # shard names from a model file: never a path outside
                if not isinstance(v, str):
                    raise InvalidModelError(
                        f"{model}: {name} maps a tensor to {str(v)[:80]!r}, not a file name; fix the index file"
                    )
                names.repo_path(v, f"{model}: {name} weight_map", InvalidModelError)
            needed = set(index["weight_map"].values())
            missing = sorted(needed - set(matched))
            if missing:
                raise InvalidModelError(
                    f"{model}: weight files referenced in {name} but missing: "
                    f"{', '.join(missing)}; re-upload them or fix the index"
                )
            skipped = [{"path": p, "why": f"not in {name}"} for p in matched if p not in needed]
            matched = [p for p in matched if p in needed]
            used_index = name
        files = sorted(matched, key=natural_key)
    else:
        used = "npcache" if fmt == "npcache" else "pt"
        skipped = [{"path": p, "why": "not needed for inference"} for p in matched if p.endswith(_NOT_FOR_INFERENCE)]
        files = sorted((p for p in matched if not p.endswith(_NOT_FOR_INFERENCE)), key=natural_key)
    if not files:
        looks = ", ".join(_PATTERNS[fmt][:1] if fmt == "pt" else _PATTERNS[fmt])
        shown = ", ".join(top[:12]) + (f", ... ({len(top)} top-level files)" if len(top) > 12 else "")
        others = [f for f in usable_formats(paths, ignore_patterns) if f != fmt]
        hint = (
            f"try --load-format {others[0]}" if others else "this repo has no loadable weights (.safetensors/.bin/.pt)"
        )
        raise UnsupportedError(
            f"Cannot find any model weights with load format '{asked}' in {model}: it loads "
            f"{looks} (top level) and the repo has {shown or 'no top-level files'}; {hint}"
        )
    return Selection(asked, used, pattern, files, used_index, skipped)
