"""Write a whole file atomically and durably: readers see the old content or the new, never half.

``write_atomic(path, data)`` creates a temporary file in ``path``'s directory
(``.<name>.<random>.tmp``, by ``tempfile.mkstemp``), writes ``data`` to it, sets its
permission bits, fsyncs it, renames it over ``path`` with ``os.replace`` and then fsyncs
the directory, so that after a crash (even a power loss) ``path`` holds either its old
content or all of the new. On any failure before the rename the temporary file is
removed and the exception re-raised; ``path`` is then untouched.

``overwrite`` says what may already be at ``path``: anything (``"any"``, the default: the
entry is replaced, a symbolic link included, never followed), a regular file only
(``"regular"``: a directory, symbolic link, device, FIFO or socket there raises
``NotRegularFile`` before anything is written), or nothing (``"none"``: ``FileExistsError``).
With ``"regular"`` and ``"none"`` what is there is looked at again right before the new file
takes the name, and a new name is made with ``os.link`` (which never replaces an entry) where
the file system has hard links, so an entry that appears meanwhile is not replaced either.

``probe_write(directory, data)`` writes ``data`` to a temporary file there, fsyncs and removes
it: a run checks with it that its directory takes files (read-only, full) before it starts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Literal

__all__ = ["NotRegularFile", "default_mode", "file_kind", "probe_write", "write_atomic"]

Overwrite = Literal["any", "regular", "none"]

_DIR_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})
"""Errors of fsync on a directory from file systems that cannot do it (the data is in place)."""


_NO_HARD_LINKS = frozenset(
    {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}
)
"""Errors of ``os.link`` from file systems (or platforms) that cannot make a hard link there."""


class NotRegularFile(OSError):
    """``write_atomic(..., overwrite="regular")`` found something other than a regular file at
    ``path``; ``kind`` says what (``file_kind``)."""

    def __init__(self, path: Path, kind: str) -> None:
        super().__init__(f"{path} is {kind}, not a regular file")
        self.path = path
        self.kind = kind


def file_kind(mode: int) -> str:
    """What an ``lstat`` ``st_mode`` is, with its article: ``a directory``, ``a symbolic link``, ..."""
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _existing(path: Path, overwrite: Overwrite) -> bool:
    """Whether ``path`` names an entry that ``overwrite`` lets be replaced (False: nothing there);
    raises when it names one it does not."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    if overwrite == "none":
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
    if overwrite == "regular" and not stat.S_ISREG(mode):
        raise NotRegularFile(path, file_kind(mode))
    return True


def _place(tmp: str, path: Path, overwrite: Overwrite) -> None:
    """Give the finished temporary file ``tmp`` the name ``path`` (see the module doc)."""
    if overwrite == "any":
        os.replace(tmp, path)
        return
    if not _existing(path, overwrite):  # looked at again, right before
        try:
            os.link(tmp, path)  # never replaces: fails when anything took the name meanwhile
        except FileExistsError:
            _existing(path, overwrite)  # raises unless it is a regular file and that may be replaced
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
        else:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
    os.replace(tmp, path)


def _write_all(fd: int, payload: bytes | memoryview) -> None:
    view = memoryview(payload)
    while view:  # os.write is unbuffered: nothing is left to flush afterwards
        view = view[os.write(fd, view) :]


def default_mode() -> int:
    """``0o666 & ~umask``: the bits ``open()`` gives a new file (``mkstemp`` would give 0o600)."""
    try:  # Linux: read the umask without changing it (os.umask is process-wide, so racy)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(
    path: Path, data: bytes | memoryview | str, *, mode: int | None = None, overwrite: Overwrite = "any"
) -> None:
    """Replace ``path`` with ``data`` (a str is written as UTF-8; a memoryview, such as a buffer's,
    without a copy) atomically, with fsync.

    ``mode``: the new file's permission bits, as given; by default ``0o666 & ~umask``, like the
    other files of a run. If ``path`` is a symbolic link, the link is replaced, not its target
    (``overwrite="any"``); ``"regular"`` raises ``NotRegularFile`` for anything but a regular
    file, ``"none"`` raises ``FileExistsError`` for any entry, both before a temporary file is
    made and again right before the rename (module doc).
    Raises the ``OSError`` of the step that failed; the temporary file is then gone. Once the
    rename is done, a directory that cannot be fsynced (a file system answering ``EINVAL`` or
    ``ENOTSUP``, a directory we may not read) is not an error: the new file is in place.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    bits = default_mode() if mode is None else mode
    if overwrite != "any":
        _existing(path, overwrite)  # before anything is made
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            _write_all(fd, payload)
            # Before the fsync, so that the bits are as durable as the content.
            if hasattr(os, "fchmod"):
                os.fchmod(fd, bits)
            else:  # pragma: no cover - Windows before Python 3.13
                os.chmod(tmp, bits)
            os.fsync(fd)
        finally:
            os.close(fd)
        _place(tmp, path, overwrite)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def probe_write(directory: Path, data: bytes | str) -> None:
    """Write ``data`` to a new temporary file in ``directory``, fsync it and remove it again.

    Raises the ``OSError`` of a directory that does not take files: read-only, out of space or
    inodes (a full disk may fail only at the write or the fsync), not ours. Leaves nothing behind.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".traintel-probe.", suffix=".tmp")
    try:
        try:
            _write_all(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable: fsync the directory that holds the new entry."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):  # a directory we may write but not read (mode -wx)
            return
        raise
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(dir_fd)
