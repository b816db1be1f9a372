"""runner/flush.py: write-back started early and one sync per filesystem, with the fallbacks it promises."""

from __future__ import annotations

import os

import pytest

from prestage.runner import flush


def test_start_writeback_and_sync_keep_the_bytes(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * (1 << 20))
    fd = os.open(p, os.O_RDONLY)
    try:
        flush.start_writeback(fd)
    finally:
        os.close(fd)
    flush.sync_filesystems([tmp_path, p, tmp_path])  # one filesystem: synced once
    assert p.read_bytes() == b"x" * (1 << 20)


def test_sync_of_a_missing_path_is_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        flush.sync_filesystems([tmp_path / "missing"])


def test_sync_calls_syncfs_once_per_filesystem(tmp_path, monkeypatch):
    calls = []

    class Libc:
        def syncfs(self, fd):
            calls.append(os.fstat(fd).st_dev)
            return 0

    monkeypatch.setattr(flush, "_libc", Libc())
    (tmp_path / "a").mkdir()
    flush.sync_filesystems([tmp_path, tmp_path / "a"])
    assert calls == [os.stat(tmp_path).st_dev]


def test_a_failed_syncfs_raises_and_no_syncfs_falls_back_to_sync(tmp_path, monkeypatch):
    class Failing:
        def syncfs(self, fd):
            return -1

    monkeypatch.setattr(flush, "_libc", Failing())
    with pytest.raises(OSError):
        flush.sync_filesystems([tmp_path])
    synced = []
    monkeypatch.setattr(flush, "_libc", False)  # no C library found: os.sync, and no write-back hint
    monkeypatch.setattr(os, "sync", lambda: synced.append(1))
    flush.sync_filesystems([tmp_path])
    flush.start_writeback(0)
    assert synced == [1]
