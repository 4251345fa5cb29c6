"""``traintel.sinks.io.atomic.write_atomic`` on real files: content, mode, cleanup on failure, fsync order."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from traintel.sinks.io import atomic
from traintel.sinks.io.atomic import write_atomic


@pytest.fixture
def umask_027() -> Iterator[None]:
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_text_as_utf8_and_bytes_as_given(tmp_path: Path) -> None:
    text, raw = tmp_path / "a.yaml", tmp_path / "b.png"

    write_atomic(text, "run:\n  name: \u00e9t\u00e9\n")
    write_atomic(raw, b"\x89PNG\x00\xff")

    assert text.read_bytes() == "run:\n  name: \u00e9t\u00e9\n".encode()
    assert raw.read_bytes() == b"\x89PNG\x00\xff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yaml", "b.png"]


def test_empty_data_makes_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    write_atomic(path, b"")
    assert path.read_bytes() == b""


def test_default_mode_follows_the_umask_like_the_run_s_other_files(tmp_path: Path, umask_027: None) -> None:
    atomic_file, plain_file = tmp_path / "atomic.txt", tmp_path / "plain.txt"

    write_atomic(atomic_file, "x")
    plain_file.write_text("x")  # how the run's other files are made

    assert atomic.default_mode() == 0o640
    assert mode_of(atomic_file) == mode_of(plain_file) == 0o640  # mkstemp alone gives 0o600


def test_explicit_mode_is_applied_as_given(tmp_path: Path, umask_027: None) -> None:
    path = tmp_path / "secret"
    write_atomic(path, "x", mode=0o604)  # not masked by the umask
    assert mode_of(path) == 0o604


def test_replaces_an_existing_file_and_keeps_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("old content, longer than the new one\n")
    old_inode = path.stat().st_ino

    write_atomic(path, "new\n")

    assert path.read_text() == "new\n"
    assert path.stat().st_ino != old_inode  # a new file renamed over it, not rewritten in place
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def _fail(exc: BaseException) -> Callable[..., Any]:
    def fail(*_args: Any) -> Any:
        raise exc

    return fail


@pytest.mark.parametrize(
    ("call", "exc"),
    [
        ("replace", OSError(errno.EXDEV, "Invalid cross-device link")),
        ("fsync", OSError(errno.EIO, "Input/output error")),
        ("write", OSError(errno.ENOSPC, "No space left on device")),
        ("fsync", KeyboardInterrupt()),
    ],
    ids=["replace-fails", "fsync-fails", "disk-full", "interrupted"],
)
def test_a_failure_leaves_the_old_file_intact_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, exc: BaseException
) -> None:
    path = tmp_path / "report.png"
    path.write_bytes(b"old")
    monkeypatch.setattr(f"traintel.sinks.io.atomic.os.{call}", _fail(exc))

    with pytest.raises(type(exc)) as raised:
        write_atomic(path, b"new" * 1000)

    assert raised.value is exc
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]


def test_a_missing_directory_raises_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "missing" / "report.png", b"x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_a_read_only_directory_raises_and_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "report.png"
    path.write_bytes(b"old")
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            write_atomic(path, b"new")
    finally:
        tmp_path.chmod(0o755)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]


def _kind(fd: int) -> tuple[str, int]:
    st = os.fstat(fd)
    return ("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino)


def test_fsync_file_then_replace_then_fsync_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("old")
    calls: list[tuple[Any, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        kind, inode = _kind(fd)
        # What the file holds when it is synced: all of the data, with its final mode.
        content = os.pread(fd, 100, 0) if kind == "file" else None
        mode = stat.S_IMODE(os.fstat(fd).st_mode) if kind == "file" else None
        calls.append(("fsync", kind, inode, content, mode))
        real_fsync(fd)

    def replace(src: str, dst: Path) -> None:
        calls.append(("replace", Path(src).parent, Path(src).name.startswith(".config.yaml."), dst))
        real_replace(src, dst)

    monkeypatch.setattr("traintel.sinks.io.atomic.os.fsync", fsync)
    monkeypatch.setattr("traintel.sinks.io.atomic.os.replace", replace)

    write_atomic(path, "new", mode=0o640)

    monkeypatch.undo()
    assert calls == [
        ("fsync", "file", path.stat().st_ino, b"new", 0o640),
        ("replace", tmp_path, True, path),
        ("fsync", "dir", tmp_path.stat().st_ino, None, None),
    ]
    assert path.read_text() == "new"


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_a_directory_that_cannot_be_fsynced_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    path = tmp_path / "report.png"
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if _kind(fd)[0] == "dir":
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr("traintel.sinks.io.atomic.os.fsync", fsync)
    write_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"new"


def test_a_directory_fsync_error_is_raised_after_the_file_is_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "report.png"
    path.write_bytes(b"old")
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if _kind(fd)[0] == "dir":
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr("traintel.sinks.io.atomic.os.fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        write_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]
