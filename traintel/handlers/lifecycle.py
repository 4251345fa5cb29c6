"""The run's two bracketing records: ``run.start`` before training, exactly one ``run.end`` after it."""

from __future__ import annotations

import time
from collections.abc import Callable

from traintel.engine.progress import Progress
from traintel.records import Record, RunEndRecord, RunStartRecord


class RunLifecycle:
    """Emit ``run.start`` when the run starts and exactly one ``run.end`` when it has ended.

    Called by ``Run.run`` around ``trainer.run()``, not from Ignite events, so that handlers
    attached to ``COMPLETED``, ``TERMINATE`` or ``EXCEPTION_RAISED`` have all run (and their
    log lines are on stdout) before ``run.end``.
    """

    def __init__(
        self,
        emit: Callable[[Record], None],
        start_record: Callable[[], RunStartRecord],
        run_id: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        attempt: int = 0,
    ) -> None:
        self.emit = emit
        self.start_record = start_record
        self.run_id = run_id
        self.rank = rank
        self.world_size = world_size
        self.attempt = attempt
        """The run's attempt, for ``run.end`` (``start_record`` builds ``run.start`` with it)."""
        self.ended: RunEndRecord | None = None
        self._t0: float | None = None

    @property
    def running(self) -> bool:
        """Whether ``run.start`` is out and ``run.end`` not yet."""
        return self._t0 is not None and self.ended is None

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self.emit(self.start_record())

    def end(self, status: str, reason: str, progress: Progress) -> RunEndRecord:
        """Emit ``run.end`` (once: a second call returns the first record).

        ``status`` is ``completed`` (max_epochs reached, or a handler such as EarlyStopping ended
        the run), ``terminated`` (a signal, or a peer rank's) or ``failed`` (an exception).
        """
        if self.ended is not None:
            return self.ended
        started = self._t0 if self._t0 is not None else time.perf_counter()
        self.ended = RunEndRecord(
            run_id=self.run_id,
            time=time.time(),
            rank=self.rank,
            world_size=self.world_size,
            attempt=self.attempt,
            status=status,
            reason=reason,
            epoch=progress.epoch,
            step=progress.run_steps,
            items_total=progress.run_items,
            duration_seconds=time.perf_counter() - started,
        )
        self.emit(self.ended)
        return self.ended
