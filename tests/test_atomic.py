"""Atomic writes: a file or a directory is replaced whole, with the mode a plain open() or mkdir() would give."""

import errno
import os
import stat
import sys

import pytest

from mini_transformer import atomic
from mini_transformer.errors import UserError, WriteError


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


# -- a replace that a kill interrupts ---------------------------------------------------------------

def _write(target, text, if_exists="replace"):
    with atomic.atomic_directory(target, if_exists=if_exists) as tmp:
        (tmp / "file.txt").write_text(text)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_replace_exchanges_the_directories_in_one_step_on_linux(tmp_path, monkeypatch):
    target = _existing(tmp_path)
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda *a: renames.append(a) or real_rename(*a))
    _write(target, "new")
    assert renames == []  # no moment without a target: the exchange swapped both at once
    assert _names(target) == ["file.txt"] and _names(tmp_path) == ["out"]


def test_a_kill_between_the_two_renames_of_a_replace_is_recovered_next_time(tmp_path, monkeypatch):
    """Without the exchange (not Linux, or a file system without it) a replace renames the old
    directory aside, then the new one in. A kill between the two leaves no target: the next write
    renames the old one back first, and removes the dead writer's temporary directory."""
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = _existing(tmp_path)
    real_rename = os.rename

    def killed_before_the_new_one_moves_in(src, dst):
        if str(src).startswith(str(tmp_path / ".tmp-")):
            raise KeyboardInterrupt  # stands for the kill: nothing after it runs in a real one
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_before_the_new_one_moves_in)
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing
    with pytest.raises(KeyboardInterrupt):
        _write(target, "new")
    monkeypatch.undo()
    assert not target.exists() and (tmp_path / ".old-out" / "old.txt").read_text() == "old"
    stale = [p for p in _names(tmp_path) if p.startswith(".tmp-out-")]
    assert len(stale) == 1
    # The killed writer's PID is this test's own, which lives on: stand in a dead one.
    (tmp_path / stale[0]).rename(tmp_path / f".tmp-out-{_dead_pid()}-abcd1234")

    atomic.recover_replaced(target)
    assert _names(tmp_path) == ["out"] and _names(target) == ["old.txt"]  # the old output is back, whole
    _write(target, "new")
    assert (target / "file.txt").read_text() == "new" and _names(tmp_path) == ["out"]


def test_a_kill_after_the_new_directory_moved_in_leaves_an_old_copy_that_is_removed(tmp_path):
    target = _existing(tmp_path)
    (tmp_path / ".old-out").mkdir()
    (tmp_path / ".old-out" / "older.txt").write_text("older")
    _write(target, "new")  # recovers first: the target is there, so .old-out is only a leftover
    assert _names(tmp_path) == ["out"] and (target / "file.txt").read_text() == "new"


def test_another_live_writers_temporary_directory_is_left_alone(tmp_path):
    live = tmp_path / f".tmp-out-{os.getppid()}-abcd1234"
    live.mkdir()
    other_name = tmp_path / f".tmp-out-x-{_dead_pid()}-abcd1234"  # the target "out-x"'s, not "out"'s
    other_name.mkdir()
    _write(tmp_path / "out", "new")
    assert _names(tmp_path) == sorted(["out", live.name, other_name.name])


def _dead_pid() -> int:
    """A PID that no process has (PIDs are below 2**22 on Linux)."""
    pid = 2**22 + 12345
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


# -- writes the machine refuses -------------------------------------------------------------------------

def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_user_error_naming_the_file_and_leaves_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic.atomic_write_bytes(target, b"old")

    def write(f):
        f.write(b"half")
        _full_disk()

    with pytest.raises(UserError) as info:
        atomic.atomic_write(target, write)
    assert str(info.value) == f"can't write {target}: no space left on the device; free some space, then run the " \
                              "command again"
    assert isinstance(info.value, WriteError) and info.value.out_of_space
    assert target.read_bytes() == b"old" and _names(tmp_path) == ["file.bin"]


def test_a_library_that_wraps_the_os_error_is_seen_through(tmp_path):
    """torch.save's zip writer raises a RuntimeError while handling the OSError; safetensors puts
    the errno into its message."""
    def torch_like(f):
        try:
            _full_disk()
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 88128 vs 88016")

    with pytest.raises(WriteError, match="no space left"):
        atomic.atomic_write(tmp_path / "a", torch_like)

    def rust_like(path):
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(WriteError, match="no space left"):
        atomic.atomic_write_named(tmp_path / "b", rust_like)


def test_a_refused_write_in_a_directory_names_the_directory(tmp_path, monkeypatch):
    with pytest.raises(WriteError) as info:
        with atomic.atomic_directory(tmp_path / "ckpt") as tmp:
            atomic.atomic_write(tmp / "weights.bin", lambda f: _full_disk())
    assert info.value.path == tmp_path / "ckpt" and _names(tmp_path) == []


def test_a_permission_error_reading_another_file_is_not_a_refused_write(tmp_path):
    def read_elsewhere(f):
        raise PermissionError(errno.EACCES, "Permission denied", "/etc/shadow")

    with pytest.raises(PermissionError):
        atomic.atomic_write(tmp_path / "out.bin", read_elsewhere)


def test_a_file_in_the_way_of_a_directory_is_one_user_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    for directory in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(UserError, match=f"can't create the directory {directory}: {tmp_path / 'afile'} is a file"):
            atomic.make_dirs(directory)
    with pytest.raises(UserError, match="is a file"):
        with atomic.atomic_directory(tmp_path / "afile", if_exists="replace"):
            pass
