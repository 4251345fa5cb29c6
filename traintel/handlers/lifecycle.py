"""Emit ``run.start``/``run.end`` around the trainer's run and close the sinks at its end."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ignite.engine import Engine, Events

from traintel.errors import one_line
from traintel.records import Record, RunEndRecord, RunStartRecord
from traintel.sinks.fanout import FanOut


class RunLifecycle:
    """Bracket a run with ``run.start`` and exactly one ``run.end``, then close the fan-out.

    ``run.end`` status is ``completed`` (max_epochs reached), ``terminated``
    (``engine.terminate()``: a handler such as EarlyStopping, or a signal; the reason
    is ``engine.state.stop_reason`` when set) or ``failed`` (an exception, re-raised).
    """

    def __init__(
        self,
        fanout: FanOut,
        start_record: Callable[[], RunStartRecord],
        run_id: str,
        *,
        before_end: Callable[[], None] | None = None,
    ) -> None:
        self.fanout = fanout
        self.start_record = start_record
        self.run_id = run_id
        self.before_end = before_end
        """Called before ``run.end`` is built (the telemetry delivers its waiting records)."""
        self.ended: RunEndRecord | None = None
        self._t0 = 0.0
        self._terminated = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.TERMINATE, self.terminated)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.failed)

    def emit(self, record: Record) -> None:
        self.fanout.emit(record)

    def started(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()
        self._terminated = False
        self.emit(self.start_record())

    def terminated(self, engine: Engine) -> None:
        self._terminated = True

    def completed(self, engine: Engine) -> None:
        if self._terminated:
            reason = getattr(engine.state, "stop_reason", None) or "terminate() called by a handler"
            self.end(engine, "terminated", reason)
        else:
            self.end(engine, "completed", "max_epochs")

    def failed(self, engine: Engine, exc: BaseException) -> None:
        # The traceback as a structured log record (a JSON line with an ``exception`` object).
        logging.getLogger("traintel").error("training failed", exc_info=exc)
        self.end(engine, "failed", one_line(exc))
        raise exc

    def end(self, engine: Engine, status: str, reason: str) -> None:
        if self.ended is not None:
            return
        if self.before_end is not None:
            try:
                self.before_end()
            except Exception:  # the run still gets its run.end; the failure is logged, not raised
                logging.getLogger("traintel").exception("delivering the last records failed")
        totals = getattr(engine.state, "totals", None)
        self.ended = RunEndRecord(
            run_id=self.run_id,
            time=time.time(),
            status=status,
            reason=reason,
            epoch=engine.state.epoch,
            step=0 if totals is None else totals.run_steps,
            items_total=0 if totals is None else totals.run_items,
            duration_seconds=time.perf_counter() - self._t0,
        )
        try:
            self.emit(self.ended)
        finally:
            self.fanout.close()
