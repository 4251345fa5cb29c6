"""Run the evaluator over the task's validation loaders at the configured cadence, and emit one
``eval.epoch`` record per loader (its ``split``)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sized
from contextlib import AbstractContextManager
from typing import Any

from ignite.engine import Engine, Events

from traintel.engine import rng
from traintel.engine.coordination import Coordinator
from traintel.engine.evaluator import eval_state
from traintel.engine.state import traintel_state
from traintel.engine.step import epochs_last_step
from traintel.records import EvalRecord, Record


class Evaluation:
    """Evaluate every split of ``loaders`` at the end of every ``every_epochs``-th epoch and after
    every ``every_steps``-th optimizer step, emitting ``eval.epoch`` per split, in order.

    A step that is also its epoch's last evaluates once, at the epoch's end (after its record), so
    a checkpoint of that step comes after both. ``stop()`` (a stop signal in a run of one process)
    cuts the pass under way and skips any later one. An evaluation that did not finish is not an
    evaluation: ``unfinished`` then holds the random generators as they were when it began, so that
    a checkpoint can say it is still owed and a resumed run evaluates again first, drawing what
    this pass would have drawn (the splits it had finished are evaluated, and logged, again).
    """

    def __init__(
        self,
        evaluator: Engine,
        loaders: Mapping[str, Iterable[Any]],
        emit: Callable[[Record], None],
        run_id: str,
        coordinator: Coordinator | None = None,
        *,
        attempt: int = 0,
        every_epochs: int | None = 1,
        every_steps: int | None = None,
        scope: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        self.evaluator = evaluator
        self.loaders = dict(loaders)
        """The validation loaders by split name, in the order they are evaluated."""
        self.emit = emit
        self.run_id = run_id
        self.attempt = attempt
        """The run's attempt (0, or n for its n-th resumption), copied into every record."""
        self.every_epochs = every_epochs
        self.every_steps = every_steps
        self.coordinator = coordinator if coordinator is not None else Coordinator()
        """Sums the loss and the items over the ranks (each evaluates its own shard): one collective."""
        self.scope = scope
        """What every evaluation runs inside: an FSDP run gathers the whole model there
        (``traintel.engine.fsdp.evaluating``)."""
        self.unfinished: dict[str, Any] | None = None
        """The generators' states (``rng.capture``) at the start of the latest evaluation when a stop
        cut or skipped it; None when it finished."""
        self._stopping = False
        self._running = False

    def stop(self) -> None:
        """Cut the evaluation under way, and skip the ones after it."""
        self._stopping = True
        if self._running:
            self.evaluator.terminate(skip_completed=True)  # its COMPLETED handlers see no partial pass

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_ended)
        if self.every_steps is not None:
            trainer.add_event_handler(Events.ITERATION_COMPLETED, self._step_ended)

    def due_at_epoch_end(self, trainer: Engine) -> bool:
        """Whether the epoch that ends evaluates: by epochs, or because its last step is due by steps."""
        steps = traintel_state(trainer).progress.run_steps
        return (self.every_epochs is not None and trainer.state.epoch % self.every_epochs == 0) or (
            self.every_steps is not None and steps > 0 and steps % self.every_steps == 0
        )

    def _epoch_ended(self, trainer: Engine) -> None:
        if self.due_at_epoch_end(trainer):
            self(trainer)

    def _step_ended(self, trainer: Engine) -> None:
        if epochs_last_step(trainer):
            return  # evaluated at the epoch's end, after its record
        st = traintel_state(trainer)
        out, every = st.step_output, self.every_steps
        if out is not None and not out.skipped and every is not None and st.progress.run_steps % every == 0:
            self(trainer)

    def __call__(self, trainer: Engine) -> None:
        """Evaluate every split now and emit their records (``Plan`` also calls this for an owed one)."""
        self.unfinished = rng.capture()
        if self._stopping:
            return
        passes: list[tuple[str, float, dict[str, float]]] = []  # split, duration, metrics
        sums: list[float] = []  # each pass's loss sum, items and batches: summed over the ranks at once
        self._running = True
        try:
            with self.scope():
                for split, loader in self.loaders.items():
                    t0 = time.perf_counter()
                    if _empty(loader):  # this rank's share is empty (a run of several ranks): it adds zeros
                        eval_state(self.evaluator).eval.reset()
                    else:
                        self.evaluator.run(loader)
                    if self._stopping:
                        return  # cut by a stop: a partial mean would be misleading; it runs again on resume
                    acc = eval_state(self.evaluator).eval
                    metrics = acc.metrics.compute() if acc.metrics is not None else {}  # over the ranks
                    sums += [float(acc.loss_sum), float(acc.items), float(acc.batches)]
                    passes.append((split, time.perf_counter() - t0, metrics))
        finally:
            self._running = False
        self.unfinished = None
        totals = iter(self.coordinator.sum_floats(sums))
        progress = traintel_state(trainer).progress
        evaluated = traintel_state(trainer).evaluated
        for split, duration, metrics in passes:
            loss_sum, items_sum, batches_sum = next(totals), next(totals), next(totals)
            items = int(items_sum)
            record = evaluated[split] = EvalRecord(
                run_id=self.run_id,
                time=time.time(),
                rank=self.coordinator.rank,
                world_size=self.coordinator.world_size,
                attempt=self.attempt,
                epoch=progress.epoch,
                step=progress.run_steps,
                loss=loss_sum / items if items else math.nan,
                items=items,
                batches=int(batches_sum),
                duration_seconds=duration,
                items_per_second=items / duration if duration > 0 else 0.0,
                split=split,
                metrics=metrics,
            )
            self.emit(record)


def _empty(loader: Iterable[Any]) -> bool:
    """Whether ``loader`` has a length of 0 (Ignite refuses to run over one)."""
    try:
        return isinstance(loader, Sized) and len(loader) == 0
    except TypeError:  # a DataLoader over an iterable data set without a length
        return False


def score(name: str, *, split: str = "val", mode: str | None = None) -> Callable[[Engine], float]:
    """A score function for Ignite's ``EarlyStopping`` and ``Checkpoint`` (higher is better): the
    value named ``eval.loss`` or ``eval.<metric>`` in the newest ``eval.epoch`` record of ``split``,
    the very value every sink shows. ``mode`` ``min`` negates it (the default for ``eval.loss``),
    ``max`` keeps it (the default for a metric). Call it with the trainer (``run.trainer``), after
    the evaluation: attach the handler to the trainer's ``EPOCH_COMPLETED`` once the run is built."""
    prefix, _, key = name.partition(".")
    if prefix != "eval" or not key:
        msg = f"score names 'eval.loss' or 'eval.<metric>', got {name!r}"
        raise ValueError(msg)
    chosen = mode if mode is not None else ("min" if key == "loss" else "max")
    if chosen not in ("min", "max"):
        msg = f"mode must be 'min' or 'max', got {mode!r}"
        raise ValueError(msg)
    sign = -1.0 if chosen == "min" else 1.0

    def value(engine: Engine) -> float:
        record = traintel_state(engine).evaluated.get(split)
        if record is None:
            msg = (
                f"no {split!r} evaluation yet to score {name!r} (score is called with the trainer, after one)"
            )
            raise RuntimeError(msg)
        if key == "loss":
            return sign * float(record.loss)
        if key not in record.metrics:
            known = ", ".join(sorted(record.metrics)) or "none"
            msg = f"{name!r}: the {split!r} evaluation has no metric {key!r} (it has {known})"
            raise KeyError(msg)
        return sign * float(record.metrics[key])

    return value
