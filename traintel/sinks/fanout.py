"""One composite that owns the sinks, delivers every record to each, and isolates failures."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from traintel import threads
from traintel.errors import ConfigError, one_line
from traintel.records import Record, SinkErrorRecord
from traintel.sinks.base import DEFAULT_CLOSE_SECONDS, RunContext, Sink

if TYPE_CHECKING:
    from traintel.sinks.health import SinkHealthCollector


SINK_FAILURES = (Exception, SystemExit)
"""What a sink may raise and have isolated: ``sys.exit`` in a sink is that sink's failure, not the
run's exit status (KeyboardInterrupt still stops the run)."""


class FanOut:
    """Deliver each record, unchanged, to every sink in order.

    A sink that raises in ``emit`` is counted in ``errors[name]``; its first failure is
    reported to the other sinks as one ``sink.error`` record, and delivery and training
    go on. ``open`` is all-or-nothing: if one sink fails to open, those already opened
    are closed and a ConfigError naming the sink propagates. ``close`` closes every
    sink once, in reverse order, even if some raise; with ``bounded=True`` a close that does not
    return in time is abandoned and reported. ``health_collector()`` exports the error counts
    and the sinks' drop counts to Prometheus.
    """

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks: list[Sink] = list(sinks)
        names = [s.name for s in self.sinks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            msg = f"sink names must be unique, got duplicates {dupes}"
            raise ValueError(msg)
        self.errors: dict[str, int] = dict.fromkeys(names, 0)
        self._context: RunContext | None = None
        self._closed = False

    def open(self, context: RunContext) -> None:
        opened: list[Sink] = []
        try:
            for sink in self.sinks:
                try:
                    sink.open(context)
                except ConfigError:
                    raise
                except SINK_FAILURES as exc:
                    msg = f"failed to open: {one_line(exc)}"
                    raise ConfigError(f"sink {sink.name!r}", msg) from None
                opened.append(sink)
        except BaseException:
            for sink in reversed(opened):
                with contextlib.suppress(Exception):  # the open error is the one to report
                    sink.close()
            raise
        self._context = context

    def emit(self, record: Record) -> None:
        for sink in self.sinks:
            try:
                sink.emit(record)
            except SINK_FAILURES as exc:
                self._failed(sink, exc)

    def emit_many(self, records: Sequence[Record]) -> None:
        """Deliver ``records`` in order to each sink in turn (one sink takes all of them, then the
        next): through the sink's ``emit_many`` when it has one (a failure counts once for the
        batch), else record by record as ``emit`` does."""
        if not records:
            return
        for sink in self.sinks:
            many = getattr(sink, "emit_many", None)
            if many is not None:
                try:
                    many(records)
                except SINK_FAILURES as exc:
                    self._failed(sink, exc)
                continue
            for record in records:
                try:
                    sink.emit(record)
                except SINK_FAILURES as exc:
                    self._failed(sink, exc)

    def report(self, sink: Sink, exc: BaseException) -> None:
        """Count ``exc`` against ``sink`` and, if it is the sink's first failure, tell the other
        sinks (a ``sink.error`` record), as for a failure in ``emit``."""
        self._failed(sink, exc)

    def _failed(self, sink: Sink, exc: BaseException, *, report: bool = True) -> None:
        count = self.errors[sink.name] = self.errors[sink.name] + 1
        if count > 1 or not report:
            return
        run_id = self._context.run_id if self._context is not None else ""
        context = self._context
        notice = SinkErrorRecord(
            run_id=run_id,
            time=time.time(),
            rank=context.rank if context is not None else 0,
            world_size=context.world_size if context is not None else 1,
            attempt=context.attempt if context is not None else 0,
            sink=sink.name,
            error=one_line(exc),
        )
        for other in self.sinks:
            if other is not sink:
                try:
                    other.emit(notice)
                except SINK_FAILURES:
                    self.errors[other.name] += 1

    def sync(self, timeout: float) -> bool:
        """Wait until every sink with a ``sync(timeout)`` method has written out what it was given
        (files flushed to disk); False when one could not within ``timeout`` seconds or raised."""
        return self._sync(timeout, durable_only=False)

    def durable(self, timeout: float) -> bool:
        """Wait until the sinks that make records durable (a true ``durable`` attribute and a
        ``sync(timeout)`` method: the diagnostic file) have written out and fsynced what they
        were given, as a checkpoint needs; False when one could not within ``timeout`` seconds,
        cannot write now (its ``sync`` says so at once), or raised. The other sinks are not
        waited for (a stdout reader that does not read cannot hold training); True at once
        when there is no such sink."""
        return self._sync(timeout, durable_only=True)

    def _sync(self, timeout: float, *, durable_only: bool) -> bool:
        deadline = time.monotonic() + timeout
        ok = True
        for sink in self.sinks:
            sync = getattr(sink, "sync", None)
            if sync is None or (durable_only and getattr(sink, "durable", False) is not True):
                continue
            try:
                ok = bool(sync(max(0.0, deadline - time.monotonic()))) and ok
            except SINK_FAILURES as exc:
                self._failed(sink, exc)
                ok = False
        return ok

    def catch_up(self, timeout: float) -> bool:
        """Wait until the sinks that deliver on a thread of their own (a ``drain(timeout)`` method:
        ``ThreadedSink``) have handed over what they were given, and report a failure they had
        meanwhile (``take_failure``) as for any sink; False when one had not within ``timeout``
        seconds in all. Before a checkpoint (the records it covers are not sent again after a
        resume, so a sink that keeps up gets them all; one that lags holds nothing longer), and
        before ``run.end``."""
        deadline = time.monotonic() + timeout
        ok = True
        for sink in self.sinks:
            drain = getattr(sink, "drain", None)
            if drain is None:
                continue
            ok = bool(drain(max(0.0, deadline - time.monotonic()))) and ok
            take = getattr(sink, "take_failure", None)
            failure = take() if callable(take) else None
            if failure is not None:
                self._failed(sink, failure)
        return ok

    def dropped(self) -> dict[str, int]:
        """Records each sink with a bounded queue (a ``dropped`` count) has dropped so far."""
        counts = {}
        for sink in self.sinks:
            value = getattr(sink, "dropped", None)
            if isinstance(value, int):
                counts[sink.name] = value
        return counts

    def health_collector(self) -> SinkHealthCollector:
        """A prometheus_client collector over ``errors`` and ``dropped()``, read at scrape time."""
        from traintel.sinks.health import SinkHealthCollector

        return SinkHealthCollector(self.errors, self.dropped)

    def close(self, *, bounded: bool = False) -> None:
        """Close every sink, in reverse order. With ``bounded``, each ``close()`` runs on a helper
        thread and is abandoned (counted, and logged as a warning, which the sinks still open
        receive) when it has not returned within the sink's ``close_timeout`` plus a second, or
        ``DEFAULT_CLOSE_SECONDS`` when it has none."""
        if self._closed:
            return
        self._closed = True
        for sink in reversed(self.sinks):
            if bounded:
                self._close_within(sink, _close_seconds(sink))
                continue
            try:
                sink.close()
            except SINK_FAILURES as exc:
                self._failed(sink, exc, report=False)

    def _close_within(self, sink: Sink, seconds: float) -> None:
        failure: list[BaseException] = []

        def close() -> None:
            try:
                sink.close()
            except SINK_FAILURES as exc:
                failure.append(exc)

        closer = threading.Thread(target=close, name=f"traintel-close-{sink.name}", daemon=True)
        threads.start(closer)
        closer.join(seconds)
        if closer.is_alive():
            self.errors[sink.name] += 1
            logging.getLogger("traintel").warning(
                "sink %r: close() did not return within %g s; abandoned", sink.name, seconds
            )
        elif failure:
            self._failed(sink, failure[0], report=False)


def _close_seconds(sink: Sink) -> float:
    own = getattr(sink, "close_timeout", None)
    if isinstance(own, int | float) and not isinstance(own, bool):
        return float(own) + 1.0
    return DEFAULT_CLOSE_SECONDS
