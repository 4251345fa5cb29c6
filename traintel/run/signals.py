"""SIGTERM, SIGINT and SIGHUP: stop a run cleanly instead of dying mid-step, and exit with the
documented status whenever the signal comes.

``traintel train`` goes through four phases:

1. Start-up, from ``remember_early`` (the command line's first step) to ``hold_early`` (the run is
   about to open its sinks): importing torch, building the config, joining the process group,
   calling the task factory. The first stop signal ends the process then and there: the handler
   writes ``traintel: error: SIGTERM during start-up: stopped before training`` to stderr with
   ``os.write`` and leaves with ``os._exit`` (143, 130, 129). Nothing is raised into the code the
   signal interrupted (an import, pydantic building a schema, C++ calling back into Python), which
   could not always unwind from it. Nothing has been written yet, and what the start-up made is
   undone first (``on_early_exit``: the empty run directory). Leaving with ``os._exit`` skips the
   ``finally`` blocks of the interrupted code (a task factory's clean-up of a half-made download),
   the ``atexit`` functions, text still buffered in ``sys.stdout``/``sys.stderr`` (a partial line;
   whole lines on stderr are already out), and, under torchrun, ``destroy_process_group``: the
   process group this rank joined is left as a killed rank leaves it, and torchrun stops the other
   ranks. A Python signal handler runs only when the main thread runs Python code, so a thread
   started by ``remember_early`` also wakes on the signal (``signal.set_wakeup_fd``) and does the
   same: a rank blocked in C++ waiting for its peers (the rendezvous, a collective) stops too.
2. Opening, from ``hold_early`` until the run's own handlers take over (``handled``): a signal is
   only noted (``early_signal``), and the run starts and ends at once as terminated, so its files
   are never left half made.
3. Running: ``handled`` calls back with the signal's name; the run decides what it means (finish
   the optimizer step and end, exit at once on a second signal, cut the exporter's linger short).
   The kernel gives a process's signal to another thread when the main thread already has one
   pending (a thread of another library: traintel's own block the stop signals, ``traintel.threads``),
   and a Python handler runs only in the main thread, once it runs Python code again: a
   second signal that came while the main thread slept or waited in a system call would wait until
   that call returned. So the watcher thread is on here too, and wakes the main thread for each stop
   signal with ``SIGURG`` (whose handler does nothing): its call is interrupted and the pending
   handlers run at once.
4. Exiting, from ``exit_on_signal(status)`` (the command is done) until the process exits: a signal
   ends the process at once with ``os._exit(status)``, the status it was exiting with anyway. The
   watcher thread is on again, so this holds while the interpreter waits for a task's thread too
   (the kernel may give the signal to that thread, which does not wake the main one). The
   interpreter's last teardown (after the ``atexit`` functions) would put the default disposition
   back, under which a signal kills the process instead; there the signals are ignored instead,
   and the process ends with its status.

Before ``remember_early`` (the interpreter starting) the default dispositions apply. A process
forked during start-up (``multiprocessing`` in a task factory) gets the default handlers back.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType

from traintel import threads
from traintel.errors import signal_exit

STOP_SIGNALS = threads.STOP_SIGNALS

_Handler = Callable[[int, FrameType | None], object] | int | None

_STARTING, _HOLDING, _EXITING = "starting", "holding", "exiting"

_phase = [_HOLDING]
"""Where ``traintel train`` is (module docstring); ``_HOLDING`` outside the command line."""
_exit_status = [0]
"""The status given to ``exit_on_signal``."""
_noted: list[str] = []
"""Signals that came while holding: the first is the start-up's (``early_signal``)."""
_lock = threading.RLock()
"""Held while deciding (and leaving), so the watcher thread and the main thread never both act,
and ``hold_early`` does not return while the start-up is being ended."""
_previous: dict[int, _Handler] = {}
"""The handlers ``remember_early`` replaced: a forked child gets them back."""
_wakeup: list[int] = []
"""[write end, the previous wakeup fd] while the watcher thread is on."""
_owner = [0]
"""The process these handlers are for (a forked child is not it)."""
_registered = [False]
_watcher: list[threading.Thread] = []
"""The watcher thread while it is on."""
NUDGE = signal.SIGURG
"""What the watcher sends the main thread while running (module docstring): ignored by default,
so the process's own use of it is unlikely; its handler does nothing."""
_undo: list[Callable[[], object]] = []
"""What ``on_early_exit`` asked to undo if a signal ends the start-up."""


def _write_stderr(text: str) -> None:
    data = text.encode()
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(2, data) :]


def _react(name: str) -> None:
    """What a stop signal does in the current phase (module docstring); called by the handler in the
    main thread or by the watcher thread, whichever runs first."""
    if os.getpid() != _owner[0]:  # a forked child that still has these handlers
        _as_without_us(name)
        return
    with _lock:
        phase = _phase[0]
        if phase == _STARTING:
            for undo in reversed(_undo):
                with contextlib.suppress(Exception):
                    undo()
            _write_stderr(f"traintel: error: {name} during start-up: stopped before training\n")
            os._exit(signal_exit(name))
        if phase == _EXITING:
            status = _exit_status[0]
            if status in {signal_exit(s.name) for s in STOP_SIGNALS}:
                _write_stderr(f"traintel: {name} while stopping: exiting at once\n")
            os._exit(status)
        _noted.append(name)


def _on_stop(signum: int, _frame: FrameType | None) -> None:
    _react(signal.Signals(signum).name)


def _watch(fd: int, write: int) -> None:
    """The watcher thread on the pipe whose write end ``write`` is the interpreter's wakeup fd: it
    reads the signal numbers that the interpreter's C-level handler writes (``signal.set_wakeup_fd``).
    While starting up and while exiting it acts at once, even while the main thread is blocked where
    a signal does not wake it (a rank waiting for its peers in C code; the interpreter waiting for a
    thread, when the kernel gave the signal to that thread). While running (``handled``) it wakes the
    main thread, whose handler decides. It ends once its pipe is no longer the wakeup fd."""
    names = {int(s): s.name for s in STOP_SIGNALS}
    main = threading.main_thread().ident
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        with _lock:
            if not _wakeup or _wakeup[0] != write:
                return
            stops = [names[number] for number in data if number in names]
            if _phase[0] in (_STARTING, _EXITING):
                for name in stops:
                    _react(name)
            elif stops and main is not None:
                with contextlib.suppress(OSError, ValueError):
                    signal.pthread_kill(main, NUDGE)


def _default(sig: int) -> _Handler:
    """The handler ``remember_early`` replaced (Python's own when it was not called)."""
    return _previous.get(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


def _as_without_us(name: str) -> None:
    """In a forked child, from the main thread: put the replaced handler back and let the signal do
    what it does there (end the process, or KeyboardInterrupt for SIGINT)."""
    sig = signal.Signals[name]
    handler = _default(sig)
    signal.signal(sig, handler)
    if callable(handler):
        handler(sig, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(sig)


_forking = threading.local()


def _before_fork() -> None:
    """While the watcher is on, its pipe is the interpreter's wakeup fd, which a forked child shares
    until ``_after_fork_in_child`` lets go of it: a signal to the child in between would reach the
    parent's watcher. The forking thread blocks the stop signals over the fork; the child gets
    them once it has let go."""
    if _wakeup:
        _forking.mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _after_fork_in_parent() -> None:
    mask = getattr(_forking, "mask", None)
    if mask is not None:
        _forking.mask = None
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _after_fork_in_child() -> None:
    """A forked child (``multiprocessing`` in a task factory) is not the command line: its stop
    signals act as they would without these handlers."""
    with contextlib.suppress(ValueError, OSError):
        if _wakeup:
            previous = signal.set_wakeup_fd(-1)
            if previous != _wakeup[0]:
                signal.set_wakeup_fd(previous)
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is _on_stop:
                signal.signal(sig, _default(sig))
    _after_fork_in_parent()  # signals that came since the fork act now, without these handlers


def _ignore_at_last() -> None:
    """The last ``atexit`` function (it is registered first): flush stdout and stderr while a signal
    still exits at once, then ignore the stop signals for the rest of the interpreter's teardown,
    which would otherwise put their default disposition back (a signal would kill the process)."""
    if _phase[0] != _EXITING or os.getpid() != _owner[0]:
        return
    _flush_stdio()
    for sig in STOP_SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, signal.SIG_IGN)


def _flush_stdio() -> None:
    """Flush ``sys.stdout`` and ``sys.stderr`` (best effort) before leaving with ``os._exit``."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()


def _above_stdio(fd: int) -> int:
    """``fd``, moved above 0, 1 and 2 when it took one of them (a closed stdout stays closed)."""
    if fd > 2:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return moved


def remember_early() -> None:
    """Start-up (module docstring): from now until ``hold_early``, a SIGTERM, SIGINT or SIGHUP writes
    the one start-up line to stderr and exits with its status (143, 130, 129). Called from the main
    thread, first thing, by ``traintel train``."""
    with _lock:
        _owner[0] = os.getpid()
        _phase[0] = _STARTING
        _noted.clear()
        if not _registered[0]:
            _registered[0] = True
            atexit.register(_ignore_at_last)
            os.register_at_fork(
                before=_before_fork,
                after_in_parent=_after_fork_in_parent,
                after_in_child=_after_fork_in_child,
            )
        for sig in STOP_SIGNALS:
            replaced = signal.signal(sig, _on_stop)
            if replaced is not _on_stop:
                _previous[sig] = replaced
        _start_watcher()


def _start_watcher() -> None:
    """Start the watcher thread on the interpreter's wakeup fd, unless it is on. Called with
    ``_lock`` held, from the main thread."""
    if _wakeup:
        return
    read, write = (_above_stdio(fd) for fd in os.pipe())
    os.set_blocking(write, False)
    _wakeup[:] = [write, signal.set_wakeup_fd(write, warn_on_full_buffer=False)]
    thread = threading.Thread(target=_watch, args=(read, write), name="traintel-signals", daemon=True)
    _watcher[:] = [thread]
    threads.start(thread)


def _stop_watcher() -> threading.Thread | None:
    """Put the previous wakeup fd back; the watcher wakes and ends (returned, to join if wanted).
    Called with ``_lock`` held, from the main thread."""
    if not _wakeup:
        return None
    write, previous = _wakeup
    _wakeup.clear()
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(previous)
    # the pipe stays open: a signal that arrived a moment ago may still write to it
    with contextlib.suppress(OSError):
        os.write(write, b"\0")  # the watcher wakes and ends
    return _watcher.pop() if _watcher else None


def hold_early() -> None:
    """From now on a signal is noted, not acted on: the run is opening its sinks and will start and
    end at once as terminated, so its files are never left half made."""
    with _lock:
        if _phase[0] == _STARTING:
            _phase[0] = _HOLDING
        _undo.clear()
        _stop_watcher()


def on_early_exit(undo: Callable[[], object]) -> None:
    """While starting up: call ``undo`` (best effort, latest first) before a signal ends the start-up,
    for what the start-up made that must not stay behind (the empty run directory it created); the
    start-up ends for good at ``hold_early``, which forgets it. Elsewhere: nothing."""
    with _lock:
        if _phase[0] == _STARTING and os.getpid() == _owner[0]:
            _undo.append(undo)


def early_signal() -> str | None:
    """The name of the first signal noted after ``hold_early`` (``SIGTERM``/``SIGINT``/``SIGHUP``)
    and before the run's handlers took over (``handled``), if one came."""
    return _noted[0] if _noted else None


def note_signal(name: str) -> None:
    """Note a stop signal that the run took once it had ended (``Run.late_signal``): it asks the
    process to leave at once, which ``exit_on_signal`` then does instead of the interpreter's
    teardown (a second or more once torch is imported)."""
    with _lock:
        _noted.append(name)


def exit_on_signal(status: int) -> None:
    """Exiting (module docstring): from now until the process exits, a stop signal ends it at once
    with ``status`` (writing ``traintel: SIGTERM while stopping: exiting at once`` to stderr when
    ``status`` is a signal's, 129/130/143). A signal noted since the run's handlers were removed
    ends it now. Called by ``traintel train`` once its command is done, from the main thread."""
    with _lock:
        _exit_status[0] = status
        _phase[0] = _EXITING
        _undo.clear()
        _owner[0] = os.getpid()
        with contextlib.suppress(ValueError):  # not the main thread: no handlers to install
            for sig in STOP_SIGNALS:
                signal.signal(sig, _on_stop)
            _start_watcher()
        if _noted:
            _flush_stdio()
            _react(_noted[-1])


@contextlib.contextmanager
def handled(callback: Callable[[str], None]) -> Iterator[None]:
    """Call ``callback("SIGTERM")`` (``"SIGINT"``, ``"SIGHUP"``) on those signals inside the block.

    Signal handlers can only be installed from the main thread; elsewhere the block runs
    without them. The previous handlers come back when the block ends, and the signals noted
    before it (``early_signal``, which the block's code has taken) are forgotten.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, _frame: FrameType | None) -> None:
        callback(signal.Signals(signum).name)

    def nudged(_signum: int, _frame: FrameType | None) -> None:
        """Nothing: being interrupted was the point (module docstring, running)."""

    previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    previous[NUDGE] = signal.signal(NUDGE, nudged)
    with _lock:
        _start_watcher()
    try:
        yield
    finally:
        with _lock:
            watcher = _stop_watcher()
        if watcher is not None:
            watcher.join(timeout=10)
        _noted.clear()
        for s, h in previous.items():
            signal.signal(s, h)
