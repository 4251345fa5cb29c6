"""Route stdlib logging and warnings (Ignite's loggers, ``warnings``, torch) into the JSON stdout stream.

While a run's JSON sink is open, a handler on the root logger formats each stdlib
record (WARNING and above) with structlog's ``ProcessorFormatter`` into one strict JSON
line: ``timestamp``, ``level``, ``event`` = the message, ``logger``, and instead of a
multi-line traceback an ``exception`` list (one object per exception in the chain, with
type, value and frames, no local variables). In the ``ecs`` profile the line has ECS
names (``@timestamp``, ``log.level``, ``message``, ``log.logger``, ``event.dataset``
``traintel.log``) and the exception is ECS's ``error.type``, ``error.message`` and
``error.stack_trace`` (the traceback as text). The line is queued on the sink's writer,
so stdout stays 100% JSON lines and never interleaves two writers. Text that is not valid
Unicode (a lone surrogate from a file name that is not UTF-8) is escaped by the renderer,
so such a message is written, not lost.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable, MutableMapping
from typing import Any, Protocol

import structlog
from structlog.processors import ExceptionRenderer
from structlog.tracebacks import ExceptionDictTransformer

from traintel.sinks.json.lines import ecs_log_layout, iso_utc


class LineSink(Protocol):
    """What the handler writes through: a JSON sink's profile, renderer and line queue
    (``traintel.sinks.json.sink.JsonSink``)."""

    @property
    def profile(self) -> str: ...

    @property
    def renderer(self) -> Any: ...

    def write_line(self, line: bytes, *, rank: int = ...) -> None: ...


_exception_dict = ExceptionRenderer(ExceptionDictTransformer(show_locals=False))


def level_name(levelno: int) -> str:
    """One of debug/info/warning/error/critical: custom levels map to the standard level below them."""
    for threshold, name in ((50, "critical"), (40, "error"), (30, "warning"), (20, "info")):
        if levelno >= threshold:
            return name
    return "debug"


def _stdlib_fields(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """The line's fields in order: timestamp (when the log record was made), level, event (the
    message), logger, then the rest (``exc_info``, which the next processor renders)."""
    record: logging.LogRecord = event_dict.pop("_record")
    event_dict.pop("_from_structlog", None)
    out = {
        "timestamp": iso_utc(record.created),
        "level": level_name(record.levelno),
        "event": str(event_dict.pop("event")).rstrip("\n"),  # warnings end their text with a newline
        "logger": record.name,
    }
    out.update(event_dict)
    return out


def _ecs_exception(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """The ``ecs`` profile's exception: ``exc_info`` as ECS ``error.type`` (the exception's class
    name), ``error.message`` (its text) and ``error.stack_trace`` (the whole traceback as Python
    prints it, chained exceptions included)."""
    exc_info = event_dict.pop("exc_info", None)
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if isinstance(exc_info, tuple) and len(exc_info) == 3 and isinstance(exc_info[1], BaseException):
        exc = exc_info[1]
        event_dict["error.type"] = type(exc).__name__
        event_dict["error.message"] = str(exc)
        event_dict["error.stack_trace"] = "".join(traceback.format_exception(type(exc), exc, exc_info[2]))
    return event_dict


def _text(_logger: Any, _method: str, line: Any) -> str:
    """A logging formatter returns text: the rendered line's bytes, decoded, without the newline
    (the handler adds it back)."""
    text: str = line.decode()
    return text.removesuffix("\n")


class JsonLogHandler(logging.Handler):
    """A logging handler that writes each record as a JSON line through a JsonSink's writer.

    The line is made by the sink's strict JSON renderer, in the sink's profile; the processors
    given to the sink are for records and do not run here.
    """

    def __init__(self, sink: LineSink, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.sink = sink
        layout: list[Any] = [_ecs_exception, ecs_log_layout] if sink.profile == "ecs" else [_exception_dict]
        self.setFormatter(
            structlog.stdlib.ProcessorFormatter(processors=[_stdlib_fields, *layout, sink.renderer, _text])
        )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.write_line(self.format(record).encode() + b"\n")
        except Exception:
            self.handleError(record)


def route_stdlib_logging(sink: LineSink, level: int = logging.WARNING) -> Callable[[], None]:
    """Install the handler on the root logger and capture ``warnings``; returns the undo."""
    handler = JsonLogHandler(sink, level)
    root = logging.getLogger()
    root.addHandler(handler)
    logging.captureWarnings(True)

    def undo() -> None:
        root.removeHandler(handler)
        logging.captureWarnings(False)

    return undo
