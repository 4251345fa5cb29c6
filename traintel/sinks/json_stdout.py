"""structlog JSON lines on stdout: one strict JSON object per record, written off the training thread."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, BinaryIO

import structlog

from traintel.records import Record
from traintel.sinks._jsonline import public_line, record_dict, record_line
from traintel.sinks._writer import ROUTINE, BackgroundWriter, FdStream
from traintel.sinks.base import RunContext

Processor = Callable[[Any, str, MutableMapping[str, Any]], Any]
"""A structlog processor: ``(logger, method, event dict)`` to the next event dict (the last: the line)."""


def renderer(profile: str = "default") -> Processor:
    """structlog's last processor: one compact JSON object and its newline, from an event dict that
    starts with timestamp, level and event (renamed to ECS names under the ``ecs`` profile);
    non-finite floats become null and are named in ``nonfinite``."""

    def render(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> bytes:
        return record_line(event_dict if type(event_dict) is dict else dict(event_dict), profile)

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


def _console_renderer() -> Processor:
    console = structlog.dev.ConsoleRenderer(colors=True, sort_keys=False)

    def render(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> bytes:
        return str(console(logger, method, event_dict)).encode() + b"\n"

    return render


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
        self.processors: list[Processor] = (
            [_console_view, _console_renderer()] if console else [renderer(profile)]
        )
        self._shared = not console and profile == "default"
        """The structlog processor chain a record's event dict goes through; the last one returns
        the line. A record already is a complete event dict, so the chain is called directly
        rather than through a bound logger, which would copy a context and re-pack the fields."""

    @property
    def dropped(self) -> int:
        """``train.batch`` records dropped because stdout's reader fell behind."""
        return self._closed_dropped if self._writer is None else self._writer.dropped

    def render(self, record: Record, dropped: int = 0) -> bytes:
        """The record's line, newline included.

        With the default JSON renderer alone in the chain, that is the record's shared line
        (``public_line``: rendered once for every JSON sink) unless ``dropped`` must be added.
        """
        if self._shared and not dropped:
            return public_line(record)
        event_dict: Any = record_dict(record)
        if dropped:
            event_dict["dropped"] = dropped
        level = record.level
        for processor in self.processors:
            event_dict = processor(None, level, event_dict)
        line: bytes = event_dict
        return line

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
