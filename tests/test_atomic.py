"""Atomic writes: the target is replaced whole, with the mode a plain open() would give."""

import os
import stat
import sys

import pytest

from mini_transformer import atomic


def test_atomic_write_replaces_whole_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    atomic.atomic_write_bytes(target, b"old")
    atomic.atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "file.bin"
    atomic.atomic_write_bytes(target, b"old")

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        atomic.atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_files_get_the_umask_mode_and_the_umask_is_never_changed(tmp_path, monkeypatch):
    atomic._umask_once.cache_clear()  # the fallback (no /proc) reads the umask once per process
    previous = os.umask(0o027)
    try:
        if sys.platform.startswith("linux"):
            # Read from /proc: os.umask (which must set the mask to read it) is not called.
            monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("os.umask was called"))
        atomic.atomic_write_bytes(tmp_path / "file.bin", b"x")
        monkeypatch.undo()
        assert stat.S_IMODE((tmp_path / "file.bin").stat().st_mode) == 0o640
    finally:
        os.umask(previous)
        atomic._umask_once.cache_clear()
