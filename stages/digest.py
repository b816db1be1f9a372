"""sha256 of files, the one implementation every stage uses (8 MiB reads into one reused buffer)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path, chunk: int = CHUNK) -> tuple[int, str]:
    """(size, sha256 hex) of one file. hashlib releases the GIL on large buffers, so threads can share work."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def sha256_hex(path: Path) -> str:
    """The sha256 hex digest of one file."""
    return sha256_file(path)[1]
