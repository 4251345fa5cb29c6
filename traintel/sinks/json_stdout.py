"""structlog JSON lines on stdout: one strict JSON object per record."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, BinaryIO

import structlog

from traintel.records import BatchRecord, Record
from traintel.sinks._jsonline import dumps, iso_utc, strict_fields
from traintel.sinks.base import RunContext


def render(_logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> bytes:
    """structlog's last processor: timestamp, level and event first, non-finite floats as null
    (named in ``nonfinite``), one compact JSON object."""
    line = {"timestamp": event_dict.pop("timestamp", None), "level": method, "event": event_dict.pop("event")}
    line.update(event_dict)
    return dumps(strict_fields(line))


class _Lines:
    """The structlog "logger" at the end of the chain: it collects rendered lines to write together."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.pending: list[bytes] = []

    def msg(self, message: bytes) -> None:
        self.pending.append(message)

    debug = info = warning = error = critical = msg

    def flush(self) -> None:
        if self.pending:
            self.stream.write(b"\n".join(self.pending) + b"\n")
            self.pending.clear()
            self.stream.flush()


class JsonSink:
    """Render each record as one JSON line through structlog.

    Fields: ``timestamp`` (ISO-8601 UTC, from the record), ``level``, ``event`` (the
    record's event name), then the record's fields. Lines go to ``stream`` (stdout's
    binary buffer by default). A step's ``train.batch`` lines are written and flushed
    together with the ``train.step`` line that follows them (one write per emission);
    every other record is flushed at once.
    """

    name = "json"

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream
        self._logger: Any = None
        self._lines: _Lines | None = None

    def open(self, context: RunContext) -> None:
        stream = self._stream if self._stream is not None else sys.stdout.buffer
        self._lines = _Lines(stream)
        self._logger = structlog.wrap_logger(
            self._lines,
            processors=[render],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
            cache_logger_on_first_use=True,
        )

    def emit(self, record: Record) -> None:
        if self._logger is None or self._lines is None:
            msg = "JsonSink.emit called before open"
            raise RuntimeError(msg)
        fields = record.fields()
        fields["timestamp"] = iso_utc(record.time)
        getattr(self._logger, record.level)(record.event, **fields)
        if not isinstance(record, BatchRecord):
            self._lines.flush()

    def close(self) -> None:
        lines, self._lines, self._logger = self._lines, None, None
        if lines is not None:
            lines.flush()
