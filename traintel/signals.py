"""SIGTERM, SIGINT and SIGHUP: stop a run cleanly instead of dying mid-step.

Two phases. From the command line's start until the run opens its sinks (importing torch,
joining the process group, calling the task factory: seconds, or far longer for a factory that
downloads data), ``remember_early`` makes the first signal end the start-up at once: it raises
``StartupInterrupted`` in the main thread, whatever the start-up is doing in Python, and nothing
has been written yet. Once ``hold_early`` is called (the sinks are about to open), a signal is
only noted, so the run starts and ends at once as terminated. While the run trains, ``handled``
calls back with the signal's name; the run decides what it means (finish the optimizer step and
end, or cut the exporter's linger short once ended).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_early: list[str] = []
_abort_early = [True]


class StartupInterrupted(BaseException):
    """A stop signal arrived before the run opened its sinks (a BaseException, so a task factory's
    ``except Exception`` cannot swallow it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"{name} during start-up")


def _remember(signum: int, _frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if not _early:
        _early.append(name)
        if _abort_early[0]:
            raise StartupInterrupted(name)


def remember_early() -> None:
    """Until ``handled`` takes over: the first SIGTERM, SIGINT or SIGHUP ends the start-up
    (``StartupInterrupted``), or after ``hold_early`` is noted (``early_signal`` returns it)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _remember)


def hold_early() -> None:
    """From now on an early signal is noted, not raised: the run is opening its sinks and will
    start and end at once as terminated, so its files are never left half made."""
    _abort_early[0] = False


def early_signal() -> str | None:
    """The name of the signal noted by ``remember_early`` (``SIGTERM``/``SIGINT``/``SIGHUP``), if one came."""
    return _early[0] if _early else None


@contextmanager
def handled(callback: Callable[[str], None]) -> Iterator[None]:
    """Call ``callback("SIGTERM")`` (``"SIGINT"``, ``"SIGHUP"``) on those signals inside the block.

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
