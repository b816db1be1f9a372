"""Names that come from outside prestage, checked before any of them becomes part of a file path.

A hub answer (an ETag, a file name in a repo listing), a flag (`--revision`, `--run`, a model id) or a model
file (a safetensors index's shard names) can name a path that climbs out of the cache or the run folder,
is absolute, or is too long for the file system. Each check here returns the name unchanged when it is
safe and raises the one-line error of the failure's class when it is not:

    etag(value, where)            a hub file's ETag: a 64-hex sha256 (LFS) or a 40-hex git object id
    revision(value, flag)         a branch, tag or commit, by git's ref-name rules (usage)
    repo_path(value, where, err)  a file name inside a repo or model folder (relative POSIX, no `..`)

Importable without torch, transformers or huggingface_hub.
"""

from __future__ import annotations

import re

from prestage.stages import errors

SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")  # \Z: "$" would also take a trailing newline
GIT_OID_RE = re.compile(r"^[0-9a-f]{40}\Z")
MAX_NAME_BYTES = 255  # one path component, as most file systems allow
MAX_PATH_BYTES = 1024  # a whole repo-relative path
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# git check-ref-format: characters a ref name never holds
_REF_BAD_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def _show(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# huggingface_hub's repo-id rule: "name" or "namespace/name" of word characters, "-" and "."; no "--" or "..",
# not ending in ".git"
_REPO_ID_RE = re.compile(r"^(?:[\w\-.]{1,96}/)?[\w\-.]{1,96}\Z")


def is_repo_id(value: str) -> bool:
    """Whether `value` is a valid hub repo id (huggingface_hub's rule)."""
    return bool(_REPO_ID_RE.match(value)) and "--" not in value and ".." not in value and not value.endswith(".git")


def etag(value: object, where: str) -> str:
    """The hub's ETag of a file, which prestage uses as the blob's file name: a lowercase 64-hex sha256 (LFS
    file) or a 40-hex git blob id (regular file); anything else is refused (integrity) before it names a path."""
    if isinstance(value, str) and (SHA256_RE.match(value) or GIT_OID_RE.match(value)):
        return value
    raise errors.IntegrityError(
        f"{where}: the hub sent ETag {_show(value)}, which is neither a sha256 nor a git object id, so the file "
        "cannot be checked or stored; nothing was written; check HF_ENDPOINT points at a Hugging Face hub"
    )


def revision(value: object, flag: str = "--revision") -> str:
    """A branch, tag or commit name as git allows it (git check-ref-format): no `..`, no leading or trailing
    `/`, no `//`, no `\\`, no control characters, spaces or `~^:?*[`, no `@{`, no part starting with `.` or
    ending with `.lock`, not ending with `.`; at most 255 bytes a part."""
    text = value if isinstance(value, str) else ""
    parts = text.split("/")
    bad = (
        not text
        or text == "@"
        or ".." in text
        or "@{" in text
        or text.startswith("/")
        or text.endswith(("/", "."))
        or "//" in text
        or _REF_BAD_CHARS.search(text) is not None
        or any(p.startswith(".") or p.endswith(".lock") for p in parts)
        or any(len(p.encode()) > MAX_NAME_BYTES for p in parts)
        or len(text.encode()) > MAX_PATH_BYTES
    )
    if bad:
        raise errors.UsageError(
            f"{flag} {_show(value)}: not a valid branch, tag or commit name (git's rules: no '..', no leading "
            "'/', no '\\', spaces or control characters); pass an existing branch, tag or commit, e.g. main"
        )
    return text


def repo_path(value: object, where: str, error: type[errors.PrestageError] = errors.IntegrityError) -> str:
    """A file name inside a repo (or a model folder): relative POSIX, no empty, `.` or `..` parts, no
    backslash or control character, within the file system's length limits; else `error`."""
    text = value if isinstance(value, str) else ""
    parts = text.split("/")
    bad = (
        not text
        or text.startswith("/")
        or "\\" in text
        or _CONTROL_RE.search(text) is not None
        or any(p in ("", ".", "..") for p in parts)
        or any(len(p.encode()) > MAX_NAME_BYTES for p in parts)
        or len(text.encode()) > MAX_PATH_BYTES
        or re.match(r"^[A-Za-z]:", text) is not None
    )
    if bad:
        raise error(
            f"{where}: file name {_show(value)} is not a relative path inside the repo (absolute, '..', "
            "backslash, empty part or too long); refusing to write it; check the model's files or HF_ENDPOINT"
        )
    return text
