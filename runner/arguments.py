"""Checks on the command line's own arguments, made before any stage runs: run names and model arguments.

`check_run_name` keeps a run folder inside --artifacts: one plain folder name, never a path. `check_model`
tells a misspelt local folder from a hub id, so `prestage resolve models/nonexistent` says the folder is
missing instead of asking the hub for a repo that cannot exist. Importable without the heavy libraries.
"""

from __future__ import annotations

import re
from pathlib import Path

from prestage.stages import errors

# huggingface_hub's repo-id rule: "name" or "namespace/name" of word characters, "-" and "."; no "--" or "..",
# not ending in ".git".
_REPO_ID_RE = re.compile(r"^(?:[\w\-.]{1,96}/)?[\w\-.]{1,96}$")


def valid_repo_id(text: str) -> bool:
    return bool(_REPO_ID_RE.match(text)) and "--" not in text and ".." not in text and not text.endswith(".git")


def check_run_name(name: str, flag: str = "--run") -> str:
    """`name` when it is one folder name (not empty, no path separator, not `.` or `..`), else a usage error."""
    bad = (
        not name
        or not name.strip()
        or "/" in name
        or "\\" in name
        or name in (".", "..")
        or ".." in name.split("/")
        or Path(name).is_absolute()
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
        or name.startswith(".")
        or len(name.encode("utf-8", "surrogatepass")) > 200
    )
    if bad:
        shown = repr(name) if len(name) <= 80 else repr(name[:77] + "...")
        raise errors.UsageError(
            f"{flag} {shown}: a run name is one folder name under --artifacts (not empty, no '/', no leading '.', "
            "no control characters, at most 200 bytes); pass e.g. --run my-model"
        )
    return name


def looks_like_path(model: str) -> bool:
    """Whether MODEL is meant as a local folder: it starts with `.`, `/` or `~`, its first component is an
    existing folder, or it is not a valid hub id."""
    if model.startswith((".", "/", "~")):
        return True
    try:
        if "/" in model and Path(model.split("/", 1)[0]).expanduser().is_dir():
            return True
    except OSError:
        pass
    return not valid_repo_id(model)


def check_model(model: str) -> None:
    """Refuse a MODEL that names a local folder which does not exist (not-found), before resolve asks the hub."""
    if not model or not model.strip():
        raise errors.UsageError("no model given; pass a hub id (org/name) or a local folder")
    path = Path(model).expanduser()
    try:
        exists = path.exists()
    except OSError:  # ENAMETOOLONG and friends: no such folder
        exists = False
    if exists or not looks_like_path(model):
        return
    where = str(path.absolute()) if len(model) <= 120 else model[:117] + "..."
    shown = model if len(model) <= 120 else model[:117] + "..."
    raise errors.NotFoundError(
        f"no such model folder: {shown} ({where} does not exist); check the path, or pass a hub id as ORG/NAME"
    )
