"""An in-memory sink for tests and notebooks: it keeps every record it receives."""

from __future__ import annotations

from traintel.records import Record
from traintel.sinks.base import RunContext


class MemorySink:
    """Collect records in ``records``; ``opened``/``closed`` count lifecycle calls."""

    name = "memory"

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.records: list[Record] = []
        self.context: RunContext | None = None
        self.opened = 0
        self.closed = 0

    def open(self, context: RunContext) -> None:
        self.context = context
        self.opened += 1

    def emit(self, record: Record) -> None:
        self.records.append(record)

    def close(self) -> None:
        self.closed += 1

    def of(self, event: str) -> list[Record]:
        """The records of one event name, in order."""
        return [r for r in self.records if r.event == event]
