"""Route stdlib logging and warnings (Ignite's loggers, ``warnings``, torch) into the JSON stdout stream.

While a run's JSON sink is open, a handler on the root logger formats each stdlib
record (WARNING and above) with structlog's ``ProcessorFormatter`` into one strict JSON
line: ``timestamp``, ``level``, ``event`` = the message, ``logger``, and instead of a
multi-line traceback an ``exception`` list (one object per exception in the chain, with
type, value and frames, no local variables). The line is queued on the sink's writer,
so stdout stays 100% JSON lines and never interleaves two writers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog
from structlog.processors import ExceptionRenderer
from structlog.tracebacks import ExceptionDictTransformer

from traintel.sinks._jsonline import iso_utc, line_bytes
from traintel.sinks.json_stdout import JsonSink

_exception_dict = ExceptionRenderer(ExceptionDictTransformer(show_locals=False))


def level_name(levelno: int) -> str:
    """One of debug/info/warning/error/critical: custom levels map to the standard level below them."""
    for threshold, name in ((50, "critical"), (40, "error"), (30, "warning"), (20, "info")):
        if levelno >= threshold:
            return name
    return "debug"


def _stdlib_fields(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    record: logging.LogRecord = event_dict.pop("_record")
    event_dict.pop("_from_structlog", None)
    event_dict["_level"] = level_name(record.levelno)
    event_dict["event"] = str(event_dict["event"]).rstrip("\n")  # warnings end their text with a newline
    event_dict["timestamp"] = iso_utc(record.created)
    event_dict["logger"] = record.name
    return event_dict


def _renderer(profile: str) -> Callable[[Any, str, MutableMapping[str, Any]], str]:
    def render(_logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        timestamp, event, level = (
            event_dict.pop("timestamp"),
            str(event_dict.pop("event")),
            event_dict.pop("_level"),
        )
        return line_bytes(timestamp, level, event, dict(event_dict), profile).decode()

    return render


class JsonLogHandler(logging.Handler):
    """A logging handler that writes each record as a JSON line through a JsonSink's writer."""

    def __init__(self, sink: JsonSink, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.sink = sink
        self.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[_stdlib_fields, _exception_dict, _renderer(sink.profile)]
            )
        )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.write_line(self.format(record).encode() + b"\n")
        except Exception:
            self.handleError(record)


def route_stdlib_logging(sink: JsonSink, level: int = logging.WARNING) -> Callable[[], None]:
    """Install the handler on the root logger and capture ``warnings``; returns the undo."""
    handler = JsonLogHandler(sink, level)
    root = logging.getLogger()
    root.addHandler(handler)
    logging.captureWarnings(True)

    def undo() -> None:
        root.removeHandler(handler)
        logging.captureWarnings(False)

    return undo
