"""When a checkpoint is taken, what it holds, and how a run continues from one.

A checkpoint is taken only at a window boundary (after an optimizer step): every
``every_steps`` optimizer steps, at the end of every ``every_epochs``-th epoch, and when a
signal stops the run; never twice for one step. Before it is committed, the records of
every step it covers are delivered and made durable in the diagnostic file (``commit_ready``),
so a resumed run's logs have no gap.

A checkpoint describes exactly what was trained and logged. It stands in one of four places,
and ``restore`` continues from each: part-way through an epoch (the windows trained so far; the
loader skips them), after an epoch's end (the next epoch starts), after an epoch's last step with
its end still to come (the resumed run first fires ``EPOCH_COMPLETED`` for it: the epoch record,
the evaluation, the user's handlers), or in an epoch's end whose evaluation a stop cut short (the
epoch record was logged: the resumed run fires ``EPOCH_COMPLETED`` again without it, and the
evaluation draws from the generators as they were when the cut one began).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events

from traintel.engine import rng
from traintel.engine.coordination import Coordinator
from traintel.engine.state import traintel_state
from traintel.engine.step import unwrapped
from traintel.engine.trainer import TraintelEngine
from traintel.engine.windows import WindowedLoader
from traintel.errors import one_line
from traintel.run import checkpoint

_log = logging.getLogger("traintel")


class Checkpointing:
    """Take checkpoints of a trainer's run into ``directory``; ``restore`` continues from one."""

    def __init__(
        self,
        directory: Path,
        *,
        trainer: TraintelEngine,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        data: WindowedLoader,
        identity: Mapping[str, Any],
        keep: int = 2,
        every_steps: int | None = None,
        every_epochs: int | None = None,
        commit_ready: Callable[[], bool] = lambda: True,
        coordinator: Coordinator | None = None,
        unfinished_end: Callable[[], Mapping[str, Any] | None] = lambda: None,
    ) -> None:
        self.directory = directory
        self.trainer = trainer
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.data = data
        self.identity = dict(identity)
        """run_id, attempt and the settings that must not change on resume, saved in each checkpoint."""
        self.keep = keep
        self.every_steps = every_steps
        self.every_epochs = every_epochs
        self.commit_ready = commit_ready
        """Deliver the waiting records and make them durable (written and fsynced in the diagnostic
        file); False if they are not (it cannot write now, or is slow), and then no checkpoint is
        committed."""
        self.coordinator = coordinator if coordinator is not None else Coordinator()
        self.unfinished_end = unfinished_end
        """At EPOCH_COMPLETED: the generators' states when the epoch's evaluation began, if a stop cut
        it (``EvaluateEachEpoch.unfinished``); None when the epoch's end finished."""
        self.rank = self.coordinator.rank
        self.saved_step: int | None = None
        """The optimizer step of the newest checkpoint taken or restored."""
        self._epoch_ended = False
        self._end_rng: Mapping[str, Any] | None = None
        """The generators at the start of this epoch's cut evaluation; None unless it was cut."""
        self.pending_end = False
        """After ``restore``: the checkpoint's epoch had its last step but not yet its end."""
        self.epoch_logged = False
        """After ``restore`` with ``pending_end``: the epoch's record was logged before its end was cut."""
        self.restore_rng: Callable[[], None] = lambda: None
        """After ``restore``: put the generators back (for a checkpoint not part-way through an epoch)."""

    def attach(self, engine: TraintelEngine) -> None:
        """Add the handlers; attach after the telemetry and the evaluation, so that a checkpoint at
        an epoch's end comes after its epoch and evaluation records."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        if self.every_steps is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._step_ended)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_ended_handler)

    def _epoch_started(self, _engine: TraintelEngine) -> None:
        self._epoch_ended = False
        self._end_rng = None

    def _step_ended(self, engine: TraintelEngine) -> None:
        steps = engine.state.progress.run_steps
        if self.every_steps is None or steps % self.every_steps or steps == self.saved_step:
            return
        self.save("every_steps")

    def _epoch_ended_handler(self, engine: TraintelEngine) -> None:
        self._end_rng = self.unfinished_end()
        if self._end_rng is not None:
            return  # a stop cut the evaluation: the epoch's end is still to come
        self._epoch_ended = True
        if self.every_epochs is not None and engine.state.epoch % self.every_epochs == 0:
            self.save("every_epochs")

    def state(self) -> dict[str, Any]:
        """Everything an exact continuation needs, as tensors and plain values."""
        engine = self.trainer
        st = traintel_state(engine)
        progress = st.progress
        # the windows trained, not those the loader yielded: one fetched when a stop came is not done
        loader = None if self._epoch_ended else {**self.data.state_dict(), "yielded": progress.windows}
        return {
            "format": checkpoint.FORMAT,
            **self.identity,
            "step": progress.run_steps,
            "epoch_ended": self._epoch_ended,
            "epoch_logged": self._end_rng is not None,
            "engine": {"iteration": st.iteration, "epoch": st.epoch, "epoch_length": st.epoch_length},
            "model": unwrapped(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "progress": progress.state_dict(),
            "loader": loader,
            "rng": {
                **(self._end_rng if self._end_rng is not None else rng.capture()),
                "loader": [g.get_state() for g in rng.loader_generators(self.data.loader)],
            },
        }

    def save(self, why: str) -> bool:
        """Commit a checkpoint of the current step (every rank at the same step); False when none
        was written. A write error is logged and leaves the earlier checkpoints as they were."""
        step = traintel_state(self.trainer).progress.run_steps
        if step == self.saved_step:
            return False
        ok = self.commit_ready()
        if not ok:
            _log.warning(
                "no checkpoint at step %d: the diagnostic file cannot write its records now, or did not "
                "within 5 s",
                step,
            )
        written = False
        if ok:
            try:
                checkpoint.write(self.directory, step, self.rank, self.state())
                written = True
            except OSError as exc:
                _log.error("checkpoint at step %d (%s) not written: %s", step, why, one_line(exc))
        if not self.coordinator.all_true(written):  # every rank wrote its part: only then prune
            return False
        self.saved_step = step
        checkpoint.prune(self.directory, self.rank, self.keep)
        return True

    def restore(self, state: Mapping[str, Any], max_epochs: int) -> None:
        """Continue the run from ``state`` (a checkpoint loaded by ``checkpoint.newest``).

        The model, optimizer, scheduler, progress and Ignite's counters are set at once; the
        generators are put back when the next pass over the data begins (after the loader has
        skipped the windows already trained on), or when the run starts for a checkpoint taken at
        an epoch's end (``restore_rng``, which ``Run.run`` calls). A checkpoint of an epoch's last
        step, taken before that epoch's end ran, sets ``pending_end``: the run then first fires
        ``EPOCH_COMPLETED`` for that epoch (its duration is unknown: the epoch record says 0 s). One
        taken in an end whose evaluation a stop cut sets ``epoch_logged`` too: its record was logged.
        """
        unwrapped(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        st = traintel_state(self.trainer)
        st.progress.load_state_dict(state["progress"])
        engine = state["engine"]
        st.iteration = engine["iteration"]
        length = st.epoch_length = engine["epoch_length"]
        logged = bool(state.get("epoch_logged", False))
        pending_end = not state["epoch_ended"] and (
            logged or (length is not None and st.progress.windows >= length)
        )
        st.epoch = engine["epoch"] if state["epoch_ended"] or pending_end else engine["epoch"] - 1
        st.max_epochs = max_epochs
        self.saved_step = state["step"]
        self._epoch_ended = bool(state["epoch_ended"])
        saved_rng = state["rng"]
        self.pending_end = pending_end
        self.epoch_logged = pending_end and logged
        if state["epoch_ended"] or pending_end:
            # the next pass draws from the loader's generators as they were at the checkpoint (set
            # now: nothing draws from them before the run starts) and from the global ones
            rng.set_loader_generators(self.data.loader, saved_rng["loader"])
            self.restore_rng = lambda: rng.restore(saved_rng)
        else:
            self.data.load_state_dict(state["loader"], after=lambda: rng.restore(saved_rng))
