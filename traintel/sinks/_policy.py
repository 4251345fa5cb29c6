"""Which records a sink's background writer may drop, and which wake it at once.

The JSON sink and the diagnostic file give these to their ``BackgroundWriter``: behind a
slow consumer only ``train.batch`` records are dropped (and counted), so step, epoch and
run records are never lost; ``run.end`` and ``sink.error`` lines are written at once.
"""

from __future__ import annotations

from traintel.records import BatchRecord, Record, RunEndRecord, SinkErrorRecord


def droppable(record: Record) -> bool:
    """``train.batch`` records may be dropped when the queue is full."""
    return isinstance(record, BatchRecord)


_URGENT = (RunEndRecord, SinkErrorRecord)


def urgent(record: Record) -> bool:
    """``run.end`` and ``sink.error`` lines wake the writer at once; others wait up to its linger time."""
    return isinstance(record, _URGENT)
