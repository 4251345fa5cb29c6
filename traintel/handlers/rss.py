"""Cheap process-memory probes for the diagnostic records."""

from __future__ import annotations

import os

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM: int | None = None


def rss_bytes() -> int | None:
    """Resident set size of this process, from /proc (Linux) or psutil when installed; else None.

    /proc/self/statm stays open and is re-read with ``pread`` (about 2 us a call).
    """
    global _STATM  # noqa: PLW0603 - one descriptor for the process, opened on first use
    try:
        if _STATM is None:
            _STATM = os.open("/proc/self/statm", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return int(os.pread(_STATM, 64, 0).split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)
