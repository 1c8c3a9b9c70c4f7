"""Atomic writes: a file or a directory is replaced whole, with the mode a plain open() or mkdir() would give."""

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


# -- whole directories ------------------------------------------------------------------------------

def _names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_directory_appears_complete_with_the_usual_mode(tmp_path):
    target = tmp_path / "parent" / "ckpt"
    previous = os.umask(0o022)
    try:
        with atomic.atomic_directory(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.startswith(".tmp-ckpt-")
            (tmp / "a.bin").write_bytes(b"a")
            (tmp / "sub").mkdir()
            (tmp / "sub" / "b.txt").write_text("b")
            assert not target.exists()  # nothing shows until the block ends
    finally:
        os.umask(previous)
    assert (target / "a.bin").read_bytes() == b"a" and (target / "sub" / "b.txt").read_text() == "b"
    assert _names(target.parent) == ["ckpt"]
    if sys.platform != "win32":
        assert stat.S_IMODE(target.stat().st_mode) == 0o755  # not mkdtemp's owner-only 0700


@pytest.mark.parametrize("if_exists", ["error", "keep", "replace"])
def test_a_failed_atomic_directory_leaves_no_target_and_no_temporary(tmp_path, if_exists):
    with pytest.raises(RuntimeError, match="disk gone"):
        with atomic.atomic_directory(tmp_path / "out", if_exists=if_exists) as tmp:
            (tmp / "half.bin").write_bytes(b"half")
            raise RuntimeError("disk gone")
    assert _names(tmp_path) == []


def _existing(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    return target


def test_atomic_directory_refuses_an_existing_target_before_writing(tmp_path):
    target = _existing(tmp_path)
    ran = False
    with pytest.raises(FileExistsError):
        with atomic.atomic_directory(target):
            ran = True
    assert not ran and _names(target) == ["old.txt"] and _names(tmp_path) == ["out"]


def test_atomic_directory_error_mode_loses_a_race_without_harm(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError):
        with atomic.atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("new")
            _existing(tmp_path)  # another writer finished first
    assert _names(target) == ["old.txt"] and _names(tmp_path) == ["out"]


def test_atomic_directory_keep_mode_keeps_the_existing_directory(tmp_path):
    target = _existing(tmp_path)
    with atomic.atomic_directory(target, if_exists="keep") as tmp:
        (tmp / "new.txt").write_text("new")
    assert _names(target) == ["old.txt"] and _names(tmp_path) == ["out"]


def test_atomic_directory_replace_mode_swaps_the_old_directory_out_whole(tmp_path):
    target = _existing(tmp_path)
    with pytest.raises(RuntimeError):
        with atomic.atomic_directory(target, if_exists="replace") as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("failed before completing")
    assert _names(target) == ["old.txt"]  # the old one stays until a new one is complete
    with atomic.atomic_directory(target, if_exists="replace") as tmp:
        (tmp / "new.txt").write_text("new")
    assert _names(target) == ["new.txt"] and _names(tmp_path) == ["out"]  # no .old-* or .tmp-* left


def test_atomic_directory_rejects_an_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="if_exists"):
        with atomic.atomic_directory(tmp_path / "out", if_exists="overwrite"):
            pass
