"""structlog JSON lines on stdout: one strict JSON object per record, written off the training thread."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, BinaryIO

import structlog
from structlog.typing import Processor

from traintel.records import BatchRecord, Record, StepRecord
from traintel.sinks._policy import DROP_LAST, droppable, urgent
from traintel.sinks.base import RunContext
from traintel.sinks.io.writer import DEFAULT_MAX_BYTES, BackgroundWriter, FdStream
from traintel.sinks.json import capture as _stdout_capture
from traintel.sinks.json.lines import LineRenderer, ecs_layout, escape_surrogates
from traintel.sinks.json.logs import JsonLogHandler

ROUTINE = (BatchRecord, StepRecord)
"""The per-step records (a terminal's console view leaves them to the progress bar)."""

_CONSOLE_HIDDEN = ("run_id", "schema_version", "config", "timestamp")


def _console_view(
    _logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Keep what a person reads: a short local time, the level, the event and its values."""
    stamp = str(event_dict.get("timestamp", ""))
    for key in _CONSOLE_HIDDEN:
        event_dict.pop(key, None)
    if event_dict.get("world_size", 1) == 1:  # one process: no rank to tell apart
        event_dict.pop("rank", None)
        event_dict.pop("world_size", None)
    if event_dict.get("attempt", 0) == 0:  # a run's first attempt: nothing to tell apart
        event_dict.pop("attempt", None)
    event_dict["timestamp"] = stamp[11:19]
    event_dict["level"] = method
    metrics = event_dict.get("metrics")
    if metrics is not None:  # a record's read-only mapping, shown as the dict it is
        event_dict["metrics"] = dict(metrics)
    return event_dict


class _ConsoleLine:
    """structlog's ConsoleRenderer, as bytes with a newline; text that is not valid Unicode is
    escaped as in the JSON lines."""

    def __init__(self) -> None:
        self._console = structlog.dev.ConsoleRenderer(colors=True, sort_keys=False)

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> bytes:
        text: str = escape_surrogates(str(self._console(logger, method, event_dict)))
        return text.encode() + b"\n"


class _RecordLogger(structlog.BoundLoggerBase):
    """A structlog bound logger (a custom wrapper class) that logs an event dict already in line order.

    ``line(method, event_dict)`` runs the processor chain on a copy of the bound context updated
    with ``event_dict`` (empty context: the dict's own order) and hands the result to the wrapped
    ``ReturnLogger``, which returns it: the line. A processor that raises ``DropEvent`` drops it.
    """

    def line(self, method: str, event_dict: dict[str, Any]) -> bytes:
        try:
            args, kw = self._process_event(method, None, event_dict)
        except structlog.DropEvent:
            return b""
        line: bytes = getattr(self._logger, method)(*args, **kw)
        return line


class JsonSink:
    """Render each record as one JSON line through a structlog processor chain.

    Fields: ``timestamp`` (ISO-8601 UTC, from the record), ``level``, ``event`` (the
    record's event name), then the record's fields, and ``dropped`` when records (or captured
    text lines) were dropped before this one. Every record's event dict goes through
    ``processors`` (structlog processors, run in order, e.g. one that adds a field), then the
    profile's layout and the strict JSON renderer, or, for ``console``, structlog's console
    renderer. Lines go to ``stream`` (by default a duplicate of ``fd``, stdout's descriptor unless given)
    from a background writer behind a bounded queue: a stalled reader never blocks training,
    and what waits for it is at most ``queue_bytes`` (``train.batch`` records are dropped first,
    once ``capacity`` lines or half of ``queue_bytes`` wait, then ``train.step`` records and
    captured text; the other records and routed log lines are always kept; see
    ``traintel.sinks.io.writer``). On a pipe, lines are written whole (``FdStream``).
    ``dropped`` counts what was lost so far.

    While open, a sink writing JSON lines to stdout's descriptor (no ``stream``, not a
    terminal, not ``console``) replaces ``sys.stdout`` when ``capture`` is true: text written to
    it becomes log lines with ``logger: "stdout"`` and level ``info`` in the same stream, one per
    line of text (``traintel.sinks.json.capture``); ``close`` puts it back. With
    ``capture_stdout``, a sink writing elsewhere (``fd``: a rank above 0's log lines on stderr)
    takes over ``sys.stdout`` the same way unless stdout is a terminal, so that stdout carries
    the lines of the rank that owns it and nothing else.
    """

    name = "json"

    def __init__(
        self,
        stream: BinaryIO | None = None,
        *,
        capacity: int = 10_000,
        close_timeout: float = 5.0,
        profile: str = "default",
        console: bool = False,
        processors: Sequence[Processor] = (),
        fd: int | None = None,
        queue_bytes: int = DEFAULT_MAX_BYTES,
        capture: bool = True,
        capture_stdout: bool = False,
    ) -> None:
        if profile not in ("default", "ecs"):
            msg = f"profile must be 'default' or 'ecs', got {profile!r}"
            raise ValueError(msg)
        self.profile = profile
        self.console = console
        """Render for a person at a terminal (structlog's ConsoleRenderer) and skip the per-step
        batch and step records, which a progress bar shows instead."""
        self._stream = stream
        self._fd = fd
        """Without ``stream``: the descriptor whose duplicate the lines go to (stdout's by default)."""
        self.capacity = capacity
        """Lines waiting before ``train.batch`` records are dropped."""
        self.queue_bytes = queue_bytes
        """Bytes waiting before ``train.step`` records are dropped (half of it: ``train.batch``)."""
        self.close_timeout = close_timeout
        self.capture = capture
        """Whether ``open`` takes over ``sys.stdout`` when this sink writes JSON lines to stdout."""
        self.capture_stdout = capture_stdout
        """Whether ``open`` takes over ``sys.stdout`` (not a terminal) when the lines go elsewhere."""
        self._writer: BackgroundWriter[Record] | None = None
        self._owned: FdStream | None = None
        self._capture: _stdout_capture.StdoutCapture | None = None
        self._pid = os.getpid()
        """The process that opened the sink (``write_line`` in a forked one writes itself)."""
        self._closed_dropped = 0
        self.renderer = LineRenderer()
        layout: list[Processor] = [ecs_layout] if profile == "ecs" else []
        ending: list[Processor] = [_console_view, _ConsoleLine()] if console else [*layout, self.renderer]
        self.processors: list[Processor] = [*processors, *ending]
        """The structlog processor chain every record's event dict goes through; the last one
        returns the line."""
        self._logger = _RecordLogger(structlog.ReturnLogger(), processors=self.processors, context={})
        """Built once: each record costs one pass through the chain, not a logger's assembly."""

    @property
    def dropped(self) -> int:
        """Records (and captured text lines) dropped because stdout's reader fell behind."""
        return self._closed_dropped if self._writer is None else self._writer.dropped

    def render(self, record: Record, dropped: int = 0) -> bytes:
        """The record's line, newline included: its event dict (plus ``dropped``) through the chain."""
        event_dict = self.renderer.event_dict(record)
        if dropped:
            event_dict["dropped"] = dropped
        return self._logger.line(record.level, event_dict)

    def open(self, context: RunContext) -> None:
        stream: BinaryIO | FdStream
        owns_stdout = False
        if self._stream is not None:
            stream = self._stream
        else:
            sys.stdout.flush()
            sys.stderr.flush()
            stdout_fd = sys.stdout.fileno()
            fd = stdout_fd if self._fd is None else self._fd
            stream = self._owned = FdStream(os.dup(fd))
            owns_stdout = fd == stdout_fd and not os.isatty(fd)
        self._pid = os.getpid()
        self._writer = BackgroundWriter(
            self.name,
            stream,
            droppable=droppable,
            urgent=urgent,
            capacity=self.capacity,
            max_bytes=self.queue_bytes,
            close_timeout=self.close_timeout,
            threaded=not self.console,
        )
        if self.capture and not self.console and (owns_stdout or self._stdout_unowned()):
            self._capture = _stdout_capture.install(self._text_line_writer())

    def _stdout_unowned(self) -> bool:
        """With ``capture_stdout``: whether stdout is a descriptor that is not a terminal."""
        if not self.capture_stdout:
            return False
        try:
            return not os.isatty(sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):  # replaced by an object without a descriptor
            return False

    def _text_line_writer(self) -> Callable[[str], None]:
        """What the stdout capture calls with each line of text: it renders the text as a routed
        log line would be (``traintel.sinks.json.logs.JsonLogHandler``'s format, in this sink's profile) with
        logger ``stdout`` and level ``info``, and queues it; it is dropped (and counted) with the
        ``train.step`` records behind a stalled reader."""
        handler = JsonLogHandler(self, logging.NOTSET)

        def write_text(text: str) -> None:
            record = logging.LogRecord(_stdout_capture.STDOUT_LOGGER, logging.INFO, "", 0, text, None, None)
            self.write_line(handler.format(record).encode() + b"\n", rank=DROP_LAST)

        return write_text

    def emit(self, record: Record) -> None:
        self.emit_many((record,))

    def emit_many(self, records: Sequence[Record]) -> None:
        """Render ``records`` in order and queue their lines together."""
        writer = self._writer
        if writer is None:
            msg = "JsonSink.emit called before open"
            raise RuntimeError(msg)
        if writer.failed is not None:
            msg = f"stdout is not writable: {type(writer.failed).__name__}: {writer.failed}"
            raise OSError(msg)
        if self.console:
            records = [r for r in records if not isinstance(r, ROUTINE)]
        writer.offer_many(records, self.render)

    def write_line(self, line: bytes, *, rank: int = 0) -> None:
        """Queue an already rendered line (a routed stdlib log record: always kept, and written
        at once; captured text: dropped like ``train.step`` records when the queue is full, rank
        ``DROP_LAST``); once the sink is closed (a sink closing after it logs), the line goes to
        stderr instead of being lost. In a process forked while the sink was open (a DataLoader
        worker), whose copy of the writer has no thread, the line is written at once, whole,
        to the sink's descriptor (``FdStream``)."""
        writer = self._writer
        if writer is None:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
        elif os.getpid() != self._pid:
            self._write_in_child(line)
        elif writer.failed is None:
            writer.submit(line, urgent=not rank, rank=rank)

    def _write_in_child(self, line: bytes) -> None:
        owned = self._owned
        with contextlib.suppress(AttributeError, OSError, ValueError):
            if owned is not None:
                owned.write(line)
            else:  # a stream of the caller's: its object is the parent's
                sys.stderr.buffer.write(line)
                sys.stderr.flush()

    def sync(self, timeout: float) -> bool:
        """Wait until the lines given so far are written to the stream (see ``FanOut.sync``)."""
        writer = self._writer
        return writer is None or writer.drain(timeout)

    def close(self) -> None:
        capture, self._capture = self._capture, None
        if capture is not None:  # its held partial line first, while the writer takes lines
            _stdout_capture.release(capture)
        writer, self._writer = self._writer, None
        if writer is None:
            return
        drained = writer.close()
        self._closed_dropped = writer.dropped
        owned, self._owned = self._owned, None
        if owned is not None and drained:  # a writer still stuck on a stalled pipe keeps its descriptor
            owned.close()
