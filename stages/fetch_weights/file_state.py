"""What fetch-weights saw of each weight file (size, mtime), and whether the file on disk still matches it.

The sizes are outputs; the mtimes are host-specific, so fetch-weights records them in `volatile` as
`mtime_ns` {path: st_mtime_ns}. `status` compares both; a file whose mtime moved is hashed, and reported when its
bytes changed (a copy made with `cp -r` keeps them; its new mtime is then recorded, so the next check reads no
byte again). A file changed with its mtime restored is for `prestage verify RUN`, which hashes everything.
Importable without the heavy libraries.
"""

from __future__ import annotations

import platform
from pathlib import Path


def mtimes(base: Path, paths) -> dict[str, int]:
    """{path: st_mtime_ns} of each file under `base` (symlinks followed, as the loader reads them)."""
    return {p: (Path(base) / p).stat().st_mtime_ns for p in paths}


def changed_since_fetched(base: Path, record, volatile: dict, rehashed: dict | None = None) -> str | None:
    """The path of the first recorded weight file whose size differs from what fetch-weights saw, or whose mtime
    differs and whose bytes are no longer the recorded sha256 (or that is gone), else None. The mtimes are
    compared only on the host that recorded them. A file whose mtime moved but whose bytes were hashed and
    found unchanged goes into `rehashed` {path: st_mtime_ns}, for the caller to record."""
    seen = volatile.get("mtime_ns")
    if not isinstance(seen, dict) or volatile.get("host") != platform.node():
        seen = {}
    for f in record.files:  # the WeightsRecord's files
        try:
            st = (Path(base) / f.path).stat()
        except OSError:
            return f.path
        if st.st_size != f.size:
            return f.path
        if f.path in seen and st.st_mtime_ns != seen[f.path]:
            # the mtime only says the file may have changed (a copy with `cp -r` changes it too): its bytes decide
            from prestage.stages.digest import sha256_hex

            if not f.sha256 or sha256_hex(Path(base) / f.path) != f.sha256:
                return f.path
            if rehashed is not None:
                rehashed[f.path] = st.st_mtime_ns
    return None
