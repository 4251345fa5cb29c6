"""SIGTERM and SIGINT: stop a run cleanly instead of dying mid-step.

Two phases. From the command line's start until the run installs its own handlers
(importing torch and building the task take seconds), ``remember_early`` only notes the
first signal, so the run then starts and ends at once as terminated. While the run
trains, ``handled`` calls back with the signal's name; the run decides what it means
(finish the optimizer step and end, or cut the exporter's linger short once ended).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_early: list[str] = []


def _remember(signum: int, _frame: FrameType | None) -> None:
    if not _early:
        _early.append(signal.Signals(signum).name)


def remember_early() -> None:
    """Until ``handled`` takes over: note the first SIGTERM or SIGINT (``early_signal`` returns it)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _remember)


def early_signal() -> str | None:
    """The name of the signal noted by ``remember_early`` (``SIGTERM``/``SIGINT``), if one came."""
    return _early[0] if _early else None


@contextmanager
def handled(callback: Callable[[str], None]) -> Iterator[None]:
    """Call ``callback("SIGTERM")`` / ``callback("SIGINT")`` on those signals inside the block.

    Signal handlers can only be installed from the main thread; elsewhere the block runs
    without them. The previous handlers come back when the block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, _frame: FrameType | None) -> None:
        callback(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
