"""Record destinations: the Sink protocol, the fan-out, and one sink per module or folder.

The names below are imported lazily, so a plug-in sink's ``from traintel.sinks.base import ...``
(or ``from traintel.sinks import RunContext``) loads neither structlog nor prometheus_client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DiagnosticSink": "traintel.sinks.diagnostic",
    "FanOut": "traintel.sinks.fanout",
    "JsonSink": "traintel.sinks.json.sink",
    "LineRenderer": "traintel.sinks.json.lines",
    "MemorySink": "traintel.sinks.memory",
    "PrometheusSink": "traintel.sinks.prometheus.sink",
    "Pushgateway": "traintel.sinks.prometheus.sink",
    "RecordCollector": "traintel.sinks.prometheus.sink",
    "RunContext": "traintel.sinks.base",
    "Sink": "traintel.sinks.base",
}

__all__ = [
    "DiagnosticSink",
    "FanOut",
    "JsonSink",
    "LineRenderer",
    "MemorySink",
    "PrometheusSink",
    "Pushgateway",
    "RecordCollector",
    "RunContext",
    "Sink",
]

if TYPE_CHECKING:
    from traintel.sinks.base import RunContext, Sink
    from traintel.sinks.diagnostic import DiagnosticSink
    from traintel.sinks.fanout import FanOut
    from traintel.sinks.json.lines import LineRenderer
    from traintel.sinks.json.sink import JsonSink
    from traintel.sinks.memory import MemorySink
    from traintel.sinks.prometheus.sink import PrometheusSink, Pushgateway, RecordCollector


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        msg = f"module 'traintel.sinks' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
