"""What fetch-weights saw of each weight file (size, mtime), and whether the file on disk still matches it.

The sizes are outputs; the mtimes are host-specific, so fetch-weights records them in `volatile` as
`mtime_ns` {path: st_mtime_ns} with the host. `status` compares both; a file whose mtime moved (or one on another
host: a run copied or unbundled elsewhere) is hashed, and reported when its bytes changed (a copy made with
`cp -r` keeps them; its mtime is then recorded, with this host as `mtime_host`, so the next check reads no byte
again). A file changed with its mtime restored is for `prestage verify RUN`, which hashes everything.
Importable without the heavy libraries.
"""

from __future__ import annotations

import platform
from pathlib import Path


def mtimes(base: Path, paths) -> dict[str, int]:
    """{path: st_mtime_ns} of each file under `base` (symlinks followed, as the loader reads them)."""
    return {p: (Path(base) / p).stat().st_mtime_ns for p in paths}


def mtimes_host(volatile: dict) -> str | None:
    """The host whose mtimes `volatile` records: where fetch-weights ran, or where the files were last hashed."""
    return volatile.get("mtime_host") or volatile.get("host")


def changed_since_fetched(base: Path, record, volatile: dict, rehashed: dict | None = None) -> str | None:
    """The path of the first recorded weight file whose size differs from what fetch-weights saw, or that is gone,
    or whose bytes are no longer the recorded sha256, else None. The bytes are hashed only where the mtime says
    they may have changed: it moved, or no mtime of this host is recorded (a run copied or unbundled on another
    machine). Each file hashed and found unchanged goes into `rehashed` {path: st_mtime_ns}, for the caller to
    record with this host."""
    seen = volatile.get("mtime_ns")
    if not isinstance(seen, dict) or mtimes_host(volatile) != platform.node():
        seen = {}
    for f in record.files:  # the WeightsRecord's files
        try:
            st = (Path(base) / f.path).stat()
        except OSError:
            return f.path
        if st.st_size != f.size:
            return f.path
        if seen.get(f.path) != st.st_mtime_ns:
            # the mtime only says the file may have changed (a copy with `cp -r` changes it too): its bytes decide
            from prestage.stages.digest import sha256_hex

            if not f.sha256 or sha256_hex(Path(base) / f.path) != f.sha256:
                return f.path
            if rehashed is not None:
                rehashed[f.path] = st.st_mtime_ns
    return None
