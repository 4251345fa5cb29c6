"""Run the evaluator after each training epoch and emit one ``eval.epoch`` record."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from ignite.engine import Engine, Events

from traintel.engine.coordination import Coordinator
from traintel.engine.evaluator import eval_state
from traintel.engine.state import traintel_state
from traintel.records import EvalRecord, Record


class EvaluateEachEpoch:
    """At every EPOCH_COMPLETED of the trainer, evaluate ``loader`` and emit ``eval.epoch``."""

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

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, trainer: Engine) -> None:
        t0 = time.perf_counter()
        self.evaluator.run(self.loader)
        if self.evaluator.should_terminate:
            return  # stopped by a signal mid-pass: a partial mean would be misleading
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
