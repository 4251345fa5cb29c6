"""Record destinations: the Sink protocol, the fan-out, and one sink per module."""

from traintel.sinks._jsonline import LineRenderer
from traintel.sinks.base import RunContext, Sink
from traintel.sinks.diagnostic import DiagnosticSink
from traintel.sinks.fanout import FanOut
from traintel.sinks.json_stdout import JsonSink
from traintel.sinks.memory import MemorySink
from traintel.sinks.prometheus import PrometheusSink, Pushgateway, RecordCollector

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
