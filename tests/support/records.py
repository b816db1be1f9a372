"""Typed records for tests that call a stage's helpers directly, with the fields a test does not care about filled."""

from __future__ import annotations

from prestage.stages.records import WeightsRecord


def weights_record(partial: dict) -> WeightsRecord:
    """A WeightsRecord from the few fetch-weights fields a loader test sets (format, files, npcache)."""
    fmt = partial.get("format", "safetensors")
    full = {
        "load_format": fmt,
        "format": fmt,
        "root": "local",
        "folder": ".",
        "index": None,
        "skipped": [],
        "files": [],
        "tensors": {},
        "total_bytes": sum(f["size"] for f in partial.get("files", [])),
        "param_count": 0,
        "npcache": None,
        "dummy": None,
        **partial,
    }
    return WeightsRecord.from_dict(full, "test record")
