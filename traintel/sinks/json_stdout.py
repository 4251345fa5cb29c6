"""structlog JSON lines on stdout: one strict JSON object per record, written off the training thread."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, MutableMapping
from typing import Any, BinaryIO

import structlog

from traintel.records import Record
from traintel.sinks._jsonline import iso_utc, line_bytes
from traintel.sinks._writer import ROUTINE, BackgroundWriter, FdStream
from traintel.sinks.base import RunContext


def renderer(profile: str = "default") -> Callable[[Any, str, MutableMapping[str, Any]], bytes]:
    """structlog's last processor: timestamp, level and event first (ECS names under the ``ecs``
    profile), non-finite floats as null (named in ``nonfinite``), one compact JSON object."""

    def render(_logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> bytes:
        timestamp, event = event_dict.pop("timestamp", None), str(event_dict.pop("event"))
        return line_bytes(timestamp, method, event, dict(event_dict), profile)

    return render


_CONSOLE_HIDDEN = ("run_id", "schema_version", "config", "timestamp")


def _console_view(
    _logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Keep what a person reads: a short local time, the level, the event and its values."""
    stamp = str(event_dict.get("timestamp", ""))
    for key in _CONSOLE_HIDDEN:
        event_dict.pop(key, None)
    event_dict["timestamp"] = stamp[11:19]
    event_dict["level"] = method
    return event_dict


def _console_renderer() -> Callable[[Any, str, MutableMapping[str, Any]], bytes]:
    console = structlog.dev.ConsoleRenderer(colors=True, sort_keys=False)

    def render(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> bytes:
        return str(console(logger, method, event_dict)).encode()

    return render


class _Last:
    """The structlog "logger" at the end of the chain: it keeps the line just rendered."""

    line = b""

    def msg(self, message: bytes) -> None:
        self.line = message

    debug = info = warning = error = critical = msg


class JsonSink:
    """Render each record as one JSON line through structlog.

    Fields: ``timestamp`` (ISO-8601 UTC, from the record), ``level``, ``event`` (the
    record's event name), then the record's fields, and ``dropped`` when ``train.batch``
    records were dropped before this one. Lines go to ``stream`` (a duplicate of the
    stdout file descriptor by default) from a background writer behind a bounded queue
    of ``capacity`` records: a stalled reader never blocks training (see
    ``traintel.sinks._writer``). ``dropped`` counts the records lost so far.
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
    ) -> None:
        if profile not in ("default", "ecs"):
            msg = f"profile must be 'default' or 'ecs', got {profile!r}"
            raise ValueError(msg)
        self.profile = profile
        self.console = console
        """Render for a person at a terminal (structlog's ConsoleRenderer) and skip the per-step
        batch and step records, which a progress bar shows instead."""
        self._stream = stream
        self.capacity = capacity
        self.close_timeout = close_timeout
        self._writer: BackgroundWriter | None = None
        self._owned: FdStream | None = None
        self._closed_dropped = 0
        self._last = _Last()
        self._logger: Any = structlog.wrap_logger(
            self._last,
            processors=[_console_view, _console_renderer()] if console else [renderer(profile)],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
            cache_logger_on_first_use=True,
        )

    @property
    def dropped(self) -> int:
        """``train.batch`` records dropped because stdout's reader fell behind."""
        return self._closed_dropped if self._writer is None else self._writer.dropped

    def render(self, record: Record, dropped: int = 0) -> bytes:
        """The record's JSON line."""
        fields = record.fields()
        fields["timestamp"] = iso_utc(record.time)
        if dropped:
            fields["dropped"] = dropped
        getattr(self._logger, record.level)(record.event, **fields)
        return self._last.line + b"\n"

    def open(self, context: RunContext) -> None:
        stream: BinaryIO | FdStream
        if self._stream is not None:
            stream = self._stream
        else:
            sys.stdout.flush()
            stream = self._owned = FdStream(os.dup(sys.stdout.fileno()))
        self._writer = BackgroundWriter(
            self.name,
            stream,
            capacity=self.capacity,
            close_timeout=self.close_timeout,
            threaded=not self.console,
        )

    def emit(self, record: Record) -> None:
        if self._writer is None:
            msg = "JsonSink.emit called before open"
            raise RuntimeError(msg)
        writer = self._writer
        if writer.failed is not None:
            msg = f"stdout is not writable: {type(writer.failed).__name__}: {writer.failed}"
            raise OSError(msg)
        if self.console and isinstance(record, ROUTINE):
            return
        writer.offer(record, self.render)

    def write_line(self, line: bytes) -> None:
        """Queue an already rendered line (a routed stdlib log record); dropped after close."""
        writer = self._writer
        if writer is not None and writer.failed is None:
            writer.submit(line, urgent=True)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        drained = writer.close()
        self._closed_dropped = writer.dropped
        owned, self._owned = self._owned, None
        if owned is not None and drained:  # a writer still stuck on a stalled pipe keeps its descriptor
            owned.close()
