"""What fetch-weights saw of each weight file (size, mtime), and whether the file on disk still matches it.

The sizes are outputs; the mtimes are host-specific, so fetch-weights records them in `volatile` as
`mtime_ns` {path: st_mtime_ns}. `status` compares both without reading a byte, so a file replaced by another
of the same size is reported (then `prestage verify RUN` hashes it). Importable without the heavy libraries.
"""

from __future__ import annotations

import platform
from pathlib import Path


def mtimes(base: Path, paths) -> dict[str, int]:
    """{path: st_mtime_ns} of each file under `base` (symlinks followed, as the loader reads them)."""
    return {p: (Path(base) / p).stat().st_mtime_ns for p in paths}


def changed_since_fetched(base: Path, record, volatile: dict) -> str | None:
    """The path of the first recorded weight file whose size or mtime differs from what fetch-weights saw (or
    that is gone), else None. The mtimes are compared only on the host that recorded them."""
    seen = volatile.get("mtime_ns")
    if not isinstance(seen, dict) or volatile.get("host") != platform.node():
        seen = {}
    for f in record.files:  # the WeightsRecord's files
        try:
            st = (Path(base) / f.path).stat()
        except OSError:
            return f.path
        if st.st_size != f.size or (f.path in seen and st.st_mtime_ns != seen[f.path]):
            return f.path
    return None
