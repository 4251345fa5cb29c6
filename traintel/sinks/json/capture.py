"""``sys.stdout`` while the JSON sink owns stdout: text written to it becomes JSON log lines.

``StdoutCapture`` replaces ``sys.stdout`` (``install``) and turns every line of text written to
it (``print`` in user code, a task, a plug-in sink, a library) into one call of ``emit(text)``,
which the JSON sink renders as a log line with ``logger: "stdout"``. It is line-buffered: text
without a newline is held until the newline comes, or until ``flush()`` (``print(...,
flush=True)``) or the end of the capture. Its ``buffer`` takes bytes (decoded as UTF-8, invalid
bytes replaced). Writes to the file descriptor itself (C extensions, child processes, anything
holding the original ``sys.stdout`` or ``sys.__stdout__``) do not pass through it.

``release`` flushes a held partial line and puts the previous ``sys.stdout`` back; a capture
that someone still holds afterwards writes through to that previous stream. Text written while
``emit`` runs on the same thread (a handler that prints) or that ``emit`` fails on goes to
stderr, so nothing recurses.

A process forked while a capture is installed (a DataLoader worker) inherits it: there it starts
with no held text and fresh locks (another thread may have held one at the fork), and hands its
own lines to the same ``emit``, which must work in such a child (``JsonSink.write_line`` writes
them itself there). ``StderrForStdout`` is the ``sys.stdout`` of ``traintel train`` outside the
run: text to stderr, so that stdout carries JSON lines only.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, TextIO

STDOUT_LOGGER = "stdout"
"""The ``logger`` of a line made from text written to ``sys.stdout``."""


def _to_stderr(text: str) -> None:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.write(text)
        sys.stderr.flush()


class _BinaryCapture(io.BufferedIOBase):
    """``sys.stdout.buffer`` of a capture: bytes decoded as UTF-8 into the capture's text."""

    def __init__(self, text: StdoutCapture) -> None:
        super().__init__()
        self._text = text
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._lock = threading.Lock()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._decoder.reset()

    def writable(self) -> bool:
        return True

    def write(self, data: Any, /) -> int:
        view = memoryview(data)
        with self._lock:
            text = self._decoder.decode(view.tobytes())
        if text:
            self._text.write(text)
        return view.nbytes

    def flush(self) -> None:
        self._text.flush()

    def close(self) -> None:  # closing sys.stdout.buffer must not end the capture
        self.flush()


class StdoutCapture(io.TextIOBase):
    """A text stream that hands each line written to it to ``emit`` (module docstring)."""

    encoding = "utf-8"
    errors = "strict"
    line_buffering = True
    name = "<stdout>"
    mode = "w"

    def __init__(self, emit: Callable[[str], None], previous: TextIO | None) -> None:
        super().__init__()
        self.emit = emit
        self.previous = previous
        """The ``sys.stdout`` this capture replaced; written to once the capture is released."""
        self.active = True
        self._held: list[str] = []
        self._lock = threading.Lock()
        self._inside = threading.local()
        self._buffer = _BinaryCapture(self)
        _captures.add(self)

    def _after_fork(self) -> None:
        """In a forked child: the parent's held text stays the parent's, and a lock that another
        thread held at the fork would never be released here."""
        self._held = []
        self._lock = threading.Lock()
        self._inside = threading.local()
        self._buffer._after_fork()

    @property
    def buffer(self) -> _BinaryCapture:
        return self._buffer

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        """The replaced stream's descriptor (what is written to it directly is not captured)."""
        if self.previous is None:
            raise io.UnsupportedOperation("fileno")
        return self.previous.fileno()

    def reconfigure(self, **_options: Any) -> None:
        """Accepted and ignored (``line_buffering``, ``write_through``...): always line-buffered."""

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            msg = f"write() argument must be str, not {type(text).__name__}"
            raise TypeError(msg)
        if not self.active:
            return self._write_previous(text)
        if getattr(self._inside, "emitting", False):  # emit printed: no recursion
            _to_stderr(text)
            return len(text)
        with self._lock:
            if "\n" not in text:
                if text:
                    self._held.append(text)
                return len(text)
            lines = text.split("\n")
            rest = lines.pop()
            if self._held:
                self._held.append(lines[0])
                lines[0] = "".join(self._held)
                self._held.clear()
            if rest:
                self._held.append(rest)
            for line in lines:
                self._emit(line)
        return len(text)

    def flush(self) -> None:
        """Emit a held partial line (text not ended by a newline)."""
        if not self.active:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                if self.previous is not None:
                    self.previous.flush()
            return
        if getattr(self._inside, "emitting", False):
            return
        with self._lock:
            if self._held:
                line = "".join(self._held)
                self._held.clear()
                self._emit(line)

    def close(self) -> None:
        """Closing ``sys.stdout`` flushes; the capture ends only with ``release``."""
        self.flush()

    def _emit(self, line: str) -> None:
        self._inside.emitting = True
        try:
            self.emit(line)
        except Exception:
            _to_stderr(line + "\n")
        finally:
            self._inside.emitting = False

    def _write_previous(self, text: str) -> int:
        if self.previous is None:
            return len(text)
        return self.previous.write(text)


_captures: weakref.WeakSet[StdoutCapture] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for capture in list(_captures):
        capture._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class StderrForStdout(io.TextIOBase):
    """``sys.stdout`` for a process whose stdout carries JSON lines only (``traintel train`` with
    the JSON sink on): text written to it goes to ``sys.stderr`` (bytes to ``sys.stderr.buffer``);
    ``fileno()`` is still stdout's descriptor, where the JSON sink writes its lines. A JSON sink
    that opens over it captures ``sys.stdout`` as usual and puts this back when it closes, so what
    is printed before the run's sinks open and after they close lands on stderr."""

    encoding = "utf-8"
    errors = "strict"
    line_buffering = True
    name = "<stdout>"
    mode = "w"

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    @property
    def buffer(self) -> Any:
        return sys.stderr.buffer

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def fileno(self) -> int:
        return self.fd

    def reconfigure(self, **_options: Any) -> None:
        """Accepted and ignored, as stderr's own settings apply."""

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            msg = f"write() argument must be str, not {type(text).__name__}"
            raise TypeError(msg)
        if sys.stderr is None:
            return len(text)
        return sys.stderr.write(text)

    def flush(self) -> None:
        if sys.stderr is not None:
            sys.stderr.flush()

    def close(self) -> None:
        """Closing ``sys.stdout`` flushes; stderr stays open."""
        self.flush()


def install(emit: Callable[[str], None]) -> StdoutCapture:
    """Replace ``sys.stdout`` by a capture that hands each line to ``emit``."""
    capture = StdoutCapture(emit, sys.stdout)
    sys.stdout = capture
    return capture


def release(capture: StdoutCapture) -> None:
    """Emit a held partial line, stop capturing and put the replaced ``sys.stdout`` back (when
    ``capture`` is still ``sys.stdout``; else later writes to it go to the replaced stream)."""
    capture.flush()
    capture.active = False
    if sys.stdout is capture and capture.previous is not None:
        sys.stdout = capture.previous
