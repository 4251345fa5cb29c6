"""A process's signal masks, read from /proc."""

from __future__ import annotations

import signal


def signal_mask(pid: int, field: str) -> int:
    """The ``SigCgt`` (caught) or ``SigIgn`` (ignored) mask of ``/proc/<pid>/status``; 0 once the
    process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def bits(*signals: signal.Signals) -> int:
    return sum(1 << (s - 1) for s in signals)
