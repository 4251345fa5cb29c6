"""Which records a sink's background writer may drop, and which wake it at once.

The JSON sink and the diagnostic file give these to their ``BackgroundWriter``. Behind a slow
consumer ``train.batch`` records go first (``DROP_FIRST``: when the writer's line bound or half
its byte bound is waiting), then ``train.step`` records (``DROP_LAST``: when the whole byte bound
is waiting); every drop is counted. Epoch, eval, run and ``sink.error`` records (a few per
epoch) and routed log lines are always kept. ``run.end`` and ``sink.error`` lines are written at
once.
"""

from __future__ import annotations

from traintel.records import BatchRecord, Record, RunEndRecord, SinkErrorRecord, StepRecord

KEEP = 0
"""Never dropped."""
DROP_LAST = 1
"""Dropped only when the writer's byte bound is reached."""
DROP_FIRST = 2
"""Dropped first: when the writer's line bound or half its byte bound is reached."""


def droppable(record: Record) -> int:
    """How readily ``record`` may be dropped behind a slow consumer: ``DROP_FIRST`` for
    ``train.batch``, ``DROP_LAST`` for ``train.step``, ``KEEP`` for every other record."""
    cls = type(record)
    if cls is BatchRecord:
        return DROP_FIRST
    if cls is StepRecord:
        return DROP_LAST
    if isinstance(record, BatchRecord):
        return DROP_FIRST
    return DROP_LAST if isinstance(record, StepRecord) else KEEP


_URGENT = (RunEndRecord, SinkErrorRecord)


def urgent(record: Record) -> bool:
    """``run.end`` and ``sink.error`` lines wake the writer at once; others wait up to its linger time."""
    return isinstance(record, _URGENT)
