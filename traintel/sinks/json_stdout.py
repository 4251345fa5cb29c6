"""structlog JSON lines on stdout: one strict JSON object per record."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, BinaryIO

import structlog

from traintel.records import Record
from traintel.sinks._jsonline import dumps, iso_utc, strict_fields
from traintel.sinks.base import RunContext

_HEAD = ("timestamp", "level", "event")


def _strict(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Non-finite floats become null, the fact kept in ``nonfinite``."""
    return strict_fields(dict(event_dict))


def _head_first(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """Put timestamp, level and event first so a line reads well and sorts by time."""
    ordered = {k: event_dict[k] for k in _HEAD if k in event_dict}
    ordered.update((k, v) for k, v in event_dict.items() if k not in ordered)
    return ordered


def _render(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> bytes:
    return dumps(dict(event_dict))


class JsonSink:
    """Render each record as one JSON line through structlog.

    Fields: ``timestamp`` (ISO-8601 UTC, from the record), ``level``, ``event`` (the
    record's event name), then the record's fields. Lines go to ``stream`` (stdout's
    binary buffer by default) and are flushed one by one, as log collectors expect.
    """

    name = "json"

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream
        self._logger: Any = None

    def open(self, context: RunContext) -> None:
        stream = self._stream if self._stream is not None else sys.stdout.buffer
        self._logger = structlog.wrap_logger(
            structlog.BytesLogger(stream),
            processors=[structlog.processors.add_log_level, _strict, _head_first, _render],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
            cache_logger_on_first_use=True,
        )

    def emit(self, record: Record) -> None:
        if self._logger is None:
            msg = "JsonSink.emit called before open"
            raise RuntimeError(msg)
        fields = record.fields()
        fields["timestamp"] = iso_utc(record.time)
        getattr(self._logger, record.level)(record.event, **fields)

    def close(self) -> None:
        self._logger = None
