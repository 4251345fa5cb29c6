"""One composite that owns the sinks, delivers every record to each, and isolates failures."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from traintel.errors import ConfigError, one_line
from traintel.records import Record, SinkErrorRecord
from traintel.sinks.base import RunContext, Sink

if TYPE_CHECKING:
    from traintel.sinks.health import SinkHealthCollector


class FanOut:
    """Deliver each record, unchanged, to every sink in order.

    A sink that raises in ``emit`` is counted in ``errors[name]``; its first failure is
    reported to the other sinks as one ``sink.error`` record, and delivery and training
    go on. ``open`` is all-or-nothing: if one sink fails to open, those already opened
    are closed and a ConfigError naming the sink propagates. ``close`` closes every
    sink once, in reverse order, even if some raise. ``health_collector()`` exports the error
    counts and the sinks' drop counts to Prometheus.
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
                except Exception as exc:
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
            except Exception as exc:
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
                except Exception as exc:
                    self._failed(sink, exc)
                continue
            for record in records:
                try:
                    sink.emit(record)
                except Exception as exc:
                    self._failed(sink, exc)

    def _failed(self, sink: Sink, exc: Exception, *, report: bool = True) -> None:
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
                except Exception:
                    self.errors[other.name] += 1

    def sync(self, timeout: float) -> bool:
        """Wait until every sink with a ``sync(timeout)`` method has written out what it was given
        (files flushed to disk); False when one could not within ``timeout`` seconds or raised."""
        deadline = time.monotonic() + timeout
        ok = True
        for sink in self.sinks:
            sync = getattr(sink, "sync", None)
            if sync is None:
                continue
            try:
                ok = bool(sync(max(0.0, deadline - time.monotonic()))) and ok
            except Exception as exc:
                self._failed(sink, exc)
                ok = False
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

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sink in reversed(self.sinks):
            try:
                sink.close()
            except Exception as exc:
                self._failed(sink, exc, report=False)
