"""Hashing weight files: sha256 with 8 MiB reads, many files at once on a thread pool.

hashlib releases the GIL while it digests a large buffer, so threads hash several files in parallel.
`hash_files` returns {path: (size, sha256)}; the per-file hash is stages/digest.py's `sha256_file`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from prestage.stages.digest import sha256_file


def hash_files(paths, workers: int | None = None) -> dict:
    """{path: (size, sha256)} for every path, hashed `workers` at a time (default: CPU count, max 8)."""
    paths = list(paths)
    workers = max(1, min(workers or min(8, os.cpu_count() or 1), len(paths) or 1))
    if workers == 1:
        return {p: sha256_file(p) for p in paths}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sha256") as pool:
        return dict(zip(paths, pool.map(sha256_file, paths), strict=True))
