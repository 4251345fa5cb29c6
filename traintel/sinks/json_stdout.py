"""structlog JSON lines on stdout: one strict JSON object per record, written off the training thread."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import MutableMapping, Sequence
from typing import Any, BinaryIO

import structlog
from structlog.typing import Processor

from traintel.records import BatchRecord, Record, StepRecord
from traintel.sinks._jsonline import LineRenderer, ecs_layout
from traintel.sinks._policy import droppable, urgent
from traintel.sinks._writer import BackgroundWriter, FdStream
from traintel.sinks.base import RunContext

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
    return event_dict


class _ConsoleLine:
    """structlog's ConsoleRenderer, as bytes with a newline."""

    def __init__(self) -> None:
        self._console = structlog.dev.ConsoleRenderer(colors=True, sort_keys=False)

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> bytes:
        return str(self._console(logger, method, event_dict)).encode() + b"\n"


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
    record's event name), then the record's fields, and ``dropped`` when ``train.batch``
    records were dropped before this one. Every record's event dict goes through
    ``processors`` (structlog processors, run in order, e.g. one that adds a field), then the
    profile's layout and the strict JSON renderer, or, for ``console``, structlog's console
    renderer. Lines go to ``stream`` (by default a duplicate of ``fd``, stdout's descriptor unless given)
    from a background writer behind a bounded queue of ``capacity`` records: a stalled
    reader never blocks training (see ``traintel.sinks._writer``). ``dropped`` counts the
    records lost so far. ``renderer`` is the strict JSON renderer, which ``build_sinks``
    shares with the diagnostic file (a sink built alone makes its own).
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
        renderer: LineRenderer | None = None,
        fd: int | None = None,
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
        self.close_timeout = close_timeout
        self._writer: BackgroundWriter[Record] | None = None
        self._owned: FdStream | None = None
        self._closed_dropped = 0
        self.renderer = renderer if renderer is not None else LineRenderer()
        layout: list[Processor] = [ecs_layout] if profile == "ecs" else []
        ending: list[Processor] = [_console_view, _ConsoleLine()] if console else [*layout, self.renderer]
        self.processors: list[Processor] = [*processors, *ending]
        """The structlog processor chain every record's event dict goes through; the last one
        returns the line."""
        self._logger = _RecordLogger(structlog.ReturnLogger(), processors=self.processors, context={})
        """Built once: each record costs one pass through the chain, not a logger's assembly."""

    @property
    def dropped(self) -> int:
        """``train.batch`` records dropped because stdout's reader fell behind."""
        return self._closed_dropped if self._writer is None else self._writer.dropped

    @property
    def shares_lines(self) -> bool:
        """Whether the chain is the renderer alone, so a record's line (without ``dropped``) is
        its public line, which the diagnostic file can reuse."""
        return len(self.processors) == 1 and self.processors[0] is self.renderer

    def render(self, record: Record, dropped: int = 0) -> bytes:
        """The record's line, newline included: its event dict (plus ``dropped``) through the chain."""
        event_dict = self.renderer.event_dict(record)
        if dropped:
            event_dict["dropped"] = dropped
        return self._logger.line(record.level, event_dict)

    def _render_shared(self, record: Record, dropped: int) -> bytes:
        line = self.render(record, dropped)
        if not dropped:
            self.renderer.remember(record, line)
        return line

    def open(self, context: RunContext) -> None:
        stream: BinaryIO | FdStream
        if self._stream is not None:
            stream = self._stream
        else:
            sys.stdout.flush()
            sys.stderr.flush()
            fd = sys.stdout.fileno() if self._fd is None else self._fd
            stream = self._owned = FdStream(os.dup(fd))
        self._writer = BackgroundWriter(
            self.name,
            stream,
            droppable=droppable,
            urgent=urgent,
            capacity=self.capacity,
            close_timeout=self.close_timeout,
            threaded=not self.console,
        )

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
        if self.shares_lines:
            self.renderer.forget()
            writer.offer_many(records, self._render_shared)
        else:
            writer.offer_many(records, self.render)

    def write_line(self, line: bytes) -> None:
        """Queue an already rendered line (a routed stdlib log record); once the sink is closed
        (a sink closing after it logs), the line goes to stderr instead of being lost."""
        writer = self._writer
        if writer is None:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
        elif writer.failed is None:
            writer.submit(line, urgent=True)

    def sync(self, timeout: float) -> bool:
        """Wait until the lines given so far are written to the stream (see ``FanOut.sync``)."""
        writer = self._writer
        return writer is None or writer.drain(timeout)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        drained = writer.close()
        self._closed_dropped = writer.dropped
        owned, self._owned = self._owned, None
        if owned is not None and drained:  # a writer still stuck on a stalled pipe keeps its descriptor
            owned.close()
