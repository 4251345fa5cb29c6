"""Deliver to a slow sink on a thread of its own, so that its back-end never holds training.

A plug-in that talks to a database or a tracking server over the network may take tens of
milliseconds per delivery; on the training thread that is the step rate. ``ThreadedSink`` wraps
such a sink (one whose ``threaded`` attribute is true, or a ``sinks.extra`` entry with
``threaded: true``): ``emit``/``emit_many`` only queue the records, and one daemon thread hands
them to the sink in order, a whole queued batch to its ``emit_many`` when it has one.

The queue is bounded (``capacity`` records). When it is full, a ``train.batch`` or ``train.step``
record is dropped, counted in ``dropped`` (``traintel_sink_dropped_records_total{sink=...}``) and
reported once as a warning; the few other records (epochs, evaluations, the run's start and end,
``sink.error``) are always queued. A failure of the sink on its thread is raised by the next
``emit``/``emit_many`` on the delivering thread (after it queued its records), so the fan-out
counts and reports it there, as for any sink. Before a checkpoint the run waits a little for the
queue to empty (``drain``; ``FanOut.catch_up``): the records a checkpoint covers are not sent again
after a resume. ``close`` waits up to ``drain_seconds`` for the queue to empty, then closes the
sink; what is still queued then is dropped and counted.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from traintel import threads
from traintel.records import BatchRecord, Record, StepRecord
from traintel.sinks.base import DEFAULT_CLOSE_SECONDS, RunContext

_ROUTINE = (BatchRecord, StepRecord)
"""The records a full queue drops: many, and each superseded by the next."""


class ThreadedSink:
    """``sink`` fed from a bounded queue by a thread of its own (see the module's docstring)."""

    def __init__(self, sink: Any, *, capacity: int = 10_000, drain_seconds: float = 5.0) -> None:
        if capacity < 1:
            msg = f"capacity must be >= 1, got {capacity}"
            raise ValueError(msg)
        self.sink = sink
        self.name: str = sink.name
        self.capacity = capacity
        self.drain_seconds = drain_seconds
        own = getattr(sink, "close_timeout", None)
        inner = (
            float(own)
            if isinstance(own, int | float) and not isinstance(own, bool)
            else DEFAULT_CLOSE_SECONDS
        )
        self.close_timeout = drain_seconds + inner
        """What ``close`` may take: the drain, then the sink's own close."""
        self.dropped = 0
        """Records dropped because the queue was full, or still queued when the drain ran out."""
        self._queue: collections.deque[Record] = collections.deque()
        self._ready = threading.Condition()
        self._busy = False
        self._closing = False
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._warned = False

    def open(self, context: RunContext) -> None:
        """Open the sink on the calling thread (a bad setting stops the run at start), then start
        the delivery thread."""
        self.sink.open(context)
        self._closing = False
        self._thread = threading.Thread(target=self._deliver, name=f"traintel-sink-{self.name}", daemon=True)
        threads.start(self._thread)

    def emit(self, record: Record) -> None:
        self.emit_many((record,))

    def emit_many(self, records: Sequence[Record]) -> None:
        """Queue ``records`` (a full queue drops the routine ones), then raise a failure the sink had on
        its thread since the last call."""
        dropped = 0
        with self._ready:
            queue = self._queue
            for record in records:
                if len(queue) >= self.capacity and isinstance(record, _ROUTINE):
                    dropped += 1
                else:
                    queue.append(record)
            self._ready.notify()
        if dropped:
            self._drop(dropped, "its queue is full")
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        if not self._warned:
            self._warned = True
            logging.getLogger("traintel").warning(
                "sink %r: %d records dropped: %s (the sink is slower than training)", self.name, count, why
            )

    def _deliver(self) -> None:
        many = getattr(self.sink, "emit_many", None)
        while True:
            with self._ready:
                while not self._queue and not self._closing:
                    self._ready.wait()
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
                self._busy = True
            try:
                if many is not None:
                    many(batch)
                else:
                    for record in batch:
                        self.sink.emit(record)
            except Exception as exc:  # raised on the delivering thread by the next emit
                self._failure = exc
            finally:
                with self._ready:
                    self._busy = False
                    self._ready.notify_all()

    def take_failure(self) -> BaseException | None:
        """The failure the sink had on its thread since the last ``emit``/``emit_many``, once (so that
        the fan-out reports it before the run's end, not only at the next delivery)."""
        failure, self._failure = self._failure, None
        return failure

    def drain(self, timeout: float) -> bool:
        """Wait until every queued record was handed to the sink; False when ``timeout`` ran out."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._ready.wait(left)
        return True

    def close(self) -> None:
        """Deliver what is queued (within ``drain_seconds``), stop the thread and close the sink; a
        failure the sink had on its thread since the last ``emit`` is raised here (and counted)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            deadline = time.monotonic() + self.drain_seconds
            self.drain(self.drain_seconds)
            with self._ready:
                left = len(self._queue)
                self._queue.clear()
                self._closing = True
                self._ready.notify_all()
            if left:
                self._drop(left, "still queued when the run ended")
            thread.join(max(0.0, deadline - time.monotonic()))
        self.sink.close()
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure
