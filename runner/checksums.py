"""A bundle's checksum list (`SHA256SUMS`, the format `sha256sum` writes and `sha256sum -c` reads) and the
rule for the names a bundle may hold.

Every line is `<64 hex>  <path>` with `path` relative to the bundle root, POSIX, sorted. A name is safe when
it is relative, has no `..`, `.` or empty part, no backslash or control character, and starts with one of the
bundle's top folders (`run/`, `hub/`, `model/`) or is `bundle.json`. Importable without the heavy libraries.
"""

from __future__ import annotations

import re

from prestage.stages import errors

NAME = "SHA256SUMS"
META = "bundle.json"
TOPS = ("run", "hub", "model")
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def unsafe_reason(name: str) -> str | None:
    """Why `name` may not be a path in a bundle (None: it may)."""
    if not name:
        return "empty name"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "backslash or control character in the name"
    parts = name.split("/")
    if ".." in parts:
        return "climbs out with '..'"
    if any(p in ("", ".") for p in parts):
        return "empty or '.' part"
    if name != META and parts[0] not in TOPS:
        return f"outside the bundle's folders ({', '.join(t + '/' for t in TOPS)}, {META})"
    return None


def check_name(name: str, where: str) -> None:
    """IntegrityError (one line) when `name` is not a safe bundle path."""
    why = unsafe_reason(name)
    if why:
        raise errors.IntegrityError(
            f"{where}: unsafe entry {name!r} ({why}); the bundle is damaged or hostile: nothing was placed"
        )


def render(entries: dict[str, str]) -> bytes:
    """SHA256SUMS text for {path: sha256}, sorted by path."""
    return "".join(f"{entries[p]}  {p}\n" for p in sorted(entries)).encode()


def parse(data: bytes, where: str) -> dict[str, str]:
    """{path: sha256} from SHA256SUMS bytes; IntegrityError on any malformed, duplicate or unsafe line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.IntegrityError(f"{where}: {NAME} is not UTF-8 text; the bundle is damaged") from None
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        m = _LINE.match(line)
        if not m:
            raise errors.IntegrityError(
                f"{where}: {NAME} line {n} is not '<sha256>  <path>' ({line[:60]!r}); the bundle is damaged"
            )
        sha, name = m.groups()
        check_name(name, f"{where}: {NAME} line {n}")
        if name in out:
            raise errors.IntegrityError(f"{where}: {NAME} lists {name!r} twice; the bundle is damaged")
        out[name] = sha
    if not out:
        raise errors.IntegrityError(f"{where}: {NAME} lists no file; the bundle is damaged")
    if META not in out:
        raise errors.IntegrityError(f"{where}: {NAME} does not list {META}; the bundle is damaged")
    return out


def is_sha256(value) -> bool:
    return isinstance(value, str) and bool(_HEX64.match(value))
