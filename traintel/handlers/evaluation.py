"""Run the evaluator after each training epoch and emit one ``eval.epoch`` record."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sized
from typing import Any

from ignite.engine import Engine, Events

from traintel.engine import rng
from traintel.engine.coordination import Coordinator
from traintel.engine.evaluator import eval_state
from traintel.engine.state import traintel_state
from traintel.records import EvalRecord, Record


class EvaluateEachEpoch:
    """At every EPOCH_COMPLETED of the trainer, evaluate ``loader`` and emit ``eval.epoch``.

    ``stop()`` (a stop signal in a run of one process) cuts the pass under way and skips any later
    one. An evaluation that did not finish is not an evaluation: ``unfinished`` then holds the
    random generators as they were when it began, so that a checkpoint can say the epoch's end is
    still to come and a resumed run evaluates again, drawing what this pass would have drawn.
    """

    def __init__(
        self,
        evaluator: Engine,
        loader: Iterable[Any],
        emit: Callable[[Record], None],
        run_id: str,
        coordinator: Coordinator | None = None,
        *,
        attempt: int = 0,
    ) -> None:
        self.evaluator = evaluator
        self.loader = loader
        self.emit = emit
        self.run_id = run_id
        self.attempt = attempt
        """The run's attempt (0, or n for its n-th resumption), copied into every record."""
        self.coordinator = coordinator if coordinator is not None else Coordinator()
        """Sums the loss and the items over the ranks (each evaluates its own shard): one collective."""
        self.unfinished: dict[str, Any] | None = None
        """The generators' states (``rng.capture``) at the start of the latest epoch's evaluation
        when it was cut or skipped by ``stop``; None when it finished."""
        self._stopping = False
        self._running = False

    def stop(self) -> None:
        """Cut the evaluation under way, and skip the ones after it."""
        self._stopping = True
        if self._running:
            self.evaluator.terminate(skip_completed=True)  # its COMPLETED handlers see no partial pass

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, trainer: Engine) -> None:
        self.unfinished = rng.capture()
        if self._stopping:
            return
        t0 = time.perf_counter()
        self._running = True
        try:
            if _empty(self.loader):  # this rank's share is empty (a run of several ranks): it adds zeros
                eval_state(self.evaluator).eval.reset()
            else:
                self.evaluator.run(self.loader)
        finally:
            self._running = False
        if self._stopping:
            return  # cut by a stop: a partial mean would be misleading, and it runs again on resume
        self.unfinished = None
        duration = time.perf_counter() - t0
        acc = eval_state(self.evaluator).eval
        loss_sum, items_sum, batches_sum = self.coordinator.sum_floats(
            [float(acc.loss_sum), float(acc.items), float(acc.batches)]
        )
        items = int(items_sum)
        self.emit(
            EvalRecord(
                run_id=self.run_id,
                time=time.time(),
                rank=self.coordinator.rank,
                world_size=self.coordinator.world_size,
                attempt=self.attempt,
                epoch=trainer.state.epoch,
                step=traintel_state(trainer).progress.run_steps,
                loss=loss_sum / items if items else math.nan,
                items=items,
                batches=int(batches_sum),
                duration_seconds=duration,
                items_per_second=items / duration if duration > 0 else 0.0,
            )
        )


def _empty(loader: Iterable[Any]) -> bool:
    """Whether ``loader`` has a length of 0 (Ignite refuses to run over one)."""
    try:
        return isinstance(loader, Sized) and len(loader) == 0
    except TypeError:  # a DataLoader over an iterable data set without a length
        return False
