"""Write a whole file atomically and durably: readers see the old content or the new, never half.

``write_atomic(path, data)`` creates a temporary file in ``path``'s directory
(``.<name>.<random>.tmp``, by ``tempfile.mkstemp``), writes ``data`` to it, sets its
permission bits, fsyncs it, renames it over ``path`` with ``os.replace`` and then fsyncs
the directory, so that after a crash (even a power loss) ``path`` holds either its old
content or all of the new. On any failure before the rename the temporary file is
removed and the exception re-raised; ``path`` is then untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

__all__ = ["default_mode", "write_atomic"]

_DIR_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})
"""Errors of fsync on a directory from file systems that cannot do it (the data is in place)."""


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


def write_atomic(path: Path, data: bytes | str, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` (a str is written as UTF-8) atomically, with fsync.

    ``mode``: the new file's permission bits, as given; by default ``0o666 & ~umask``, like the
    other files of a run. If ``path`` is a symbolic link, the link is replaced, not its target.
    Raises the ``OSError`` of the step that failed; the temporary file is then gone. Once the
    rename is done, a directory that cannot be fsynced (a file system answering ``EINVAL`` or
    ``ENOTSUP``, a directory we may not read) is not an error: the new file is in place.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    bits = default_mode() if mode is None else mode
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            view = memoryview(payload)
            while view:  # os.write is unbuffered: nothing is left to flush afterwards
                view = view[os.write(fd, view) :]
            # Before the fsync, so that the bits are as durable as the content.
            if hasattr(os, "fchmod"):
                os.fchmod(fd, bits)
            else:  # pragma: no cover - Windows before Python 3.13
                os.chmod(tmp, bits)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable: fsync the directory that holds the new entry."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        dir_fd = os.open(directory, flags)
    except OSError as exc:
        # A directory we may write but not read (mode -wx), or Windows, which cannot open one.
        if exc.errno in (errno.EACCES, errno.EPERM) or os.name == "nt":
            return
        raise
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(dir_fd)
