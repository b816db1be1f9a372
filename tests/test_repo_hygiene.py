"""The tree holds no leftover merge-conflict markers (a text file with one still parses as prose or data)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = {".py", ".md", ".toml", ".txt", ".json", ".cfg", ".jinja", ""}
SKIP = {".git", ".venv", ".venv-vllm", "artifacts", "__pycache__", ".demo", ".pytest_cache", ".ruff_cache"}


def test_no_merge_conflict_markers():
    found = []
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in SKIP or any(part in SKIP or part.endswith(".egg-info") for part in rel.parts):
            continue
        if not path.is_file() or path.suffix not in TEXT or path.stat().st_size > 2_000_000:
            continue
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        found += [f"{rel}:{i}" for i, line in enumerate(lines, 1) if line.startswith(("<<<<<<< ", ">>>>>>> "))]
    assert not found, f"merge-conflict markers left in: {', '.join(found[:10])}"
