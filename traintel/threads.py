"""traintel's own threads, started with the stop signals blocked so that the main thread gets them.

The kernel gives a signal sent to the process to any thread that does not block it. Two stop
signals sent one right after the other (SIGINT, then SIGTERM) can then land on two threads whose
C-level handlers race to note them, and the main thread, where Python runs the handlers, may see
the second before the first: a run stopped by SIGINT would exit with SIGTERM's status. A thread
started by ``start`` blocks SIGTERM, SIGINT and SIGHUP for its whole life (a new thread inherits
the mask it was started under), so the kernel gives those to the main thread, which takes pending
signals lowest number first. Threads of other libraries may still get them; ``traintel.run.signals``
wakes the main thread for those.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""The signals that stop a run (``traintel.run.signals``)."""


def start(thread: threading.Thread) -> None:
    """Start ``thread`` with the stop signals blocked in it."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
