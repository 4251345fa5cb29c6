"""When a checkpoint is taken, what it holds, and how a run continues from one.

A checkpoint is taken only at a window boundary (after an optimizer step): every
``every_steps`` optimizer steps, at the end of every ``every_epochs``-th epoch, and when a
signal stops the run; never twice for one step. Before it is committed, the records of
every step it covers are delivered and made durable in the diagnostic file (``commit_ready``),
so a resumed run's logs have no gap.

A checkpoint describes exactly what was trained and logged: the run's position. It stands in
one of three places, and ``restore`` continues from each: part-way through an epoch (the windows
trained so far; the loader skips them), after an epoch's end (the next epoch starts), or after an
epoch's end whose evaluation a stop cut short (``owed``: the resumed run first evaluates that epoch,
drawing from the generators as they were when the cut evaluation began, then takes that end's
checkpoint if one is due). A checkpoint of an epoch's last step is taken after that epoch's end
(its record, its evaluation), never before, so no position lies between a step and its epoch's end.

With ``best`` (``checkpoint.best``), the same state is also written after each evaluation of its
split that is strictly better than the best so far, into ``checkpoints/best/`` (``checkpoint.write_best``),
on every rank (their evaluations have the same values), whether or not periodic checkpoints are on.
It is not a place to resume from, so it does not wait for the records to be durable.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
from traintel.errors import NonFiniteLoss, one_line
from traintel.records import CheckpointRecord, EvalRecord, Record
from traintel.run import checkpoint, layout, sharded

_log = logging.getLogger("traintel")


@dataclass(frozen=True)
class BestOf:
    """Which evaluations the best checkpoint compares (``checkpoint.best``)."""

    metric: str
    """``eval.loss`` or ``eval.<metric>``."""
    split: str
    mode: str
    """``min`` (lower is better) or ``max``."""

    def value(self, record: EvalRecord) -> float | None:
        """The compared value of an ``eval.epoch`` record; None when it has no such metric."""
        key = self.metric.removeprefix("eval.")
        if key == "loss":
            return float(record.loss)
        found = record.metrics.get(key)
        return None if found is None else float(found)

    def better(self, value: float, than: float | None) -> bool:
        """Whether ``value`` is strictly better than ``than`` (None: no best yet); a NaN never is."""
        if math.isnan(value):
            return False
        if than is None:
            return True
        return value < than if self.mode == "min" else value > than


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
        grad_scaler: Any = None,
        identity: Mapping[str, Any],
        keep: int = 2,
        every_steps: int | None = None,
        every_epochs: int | None = None,
        commit_ready: Callable[[], bool] = lambda: True,
        coordinator: Coordinator | None = None,
        unfinished_end: Callable[[], Mapping[str, Any] | None] = lambda: None,
        on_signal: bool = False,
        best: BestOf | None = None,
        shards: sharded.ShardedState | None = None,
        background: bool = False,
        emit: Callable[[Record], None] = lambda _: None,
    ) -> None:
        self.directory = directory
        self.trainer = trainer
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_scaler = grad_scaler
        """``precision: fp16``'s ``torch.amp.GradScaler`` (its scale goes on where it was), or None."""
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
        """The generators' states when the latest evaluation began, if a stop cut or skipped it
        (``Evaluation.unfinished``); None when it finished. Read at EPOCH_COMPLETED, and for a
        checkpoint part-way through an epoch (an evaluation after a step)."""
        self.on_signal = on_signal
        """Whether a stop (a signal) takes a checkpoint of the step it finished (``checkpoint.on_signal``)."""
        self.best = best
        """Which evaluations the best checkpoint compares, or None for no best checkpoint."""
        self.shards = shards
        """Under torchrun, where the model and optimizer go (a DCP directory per checkpoint, every rank
        its part); None in one process (they go into the state file)."""
        self.background = background and shards is not None
        """``checkpoint.async``: the DCP directory is written in the background; the checkpoint's
        manifests follow once it is on disk, and the next checkpoint waits for it (``settle``)."""
        self._pending: Write | None = None
        """The checkpoint under way (in the background, or just written), until ``settle``."""
        self.emit = emit
        """Where each checkpoint's ``checkpoint`` record goes (the fan-out)."""
        self.best_value: float | None = None
        """The value of the best checkpoint written (or found on resume, ``read_best``); None: none yet."""
        self._judged: EvalRecord | None = None
        """The newest evaluation of ``best.split`` compared with the best."""
        self.rank = self.coordinator.rank
        self.saved_step: int | None = None
        """The optimizer step of the newest checkpoint taken or restored."""
        self._ended = False
        """Whether the current epoch's end ran (its record logged), so that a checkpoint now holds no
        loader position: the next epoch starts on resume."""
        self._cut: Mapping[str, Any] | None = None
        """The generators at the start of this epoch's evaluation when a stop cut it; else None."""
        self.owed: OwedEnd | None = None
        """After ``restore``: what of the checkpoint's epoch end is still to run (``finish``)."""
        self.restore_rng: Callable[[], None] = lambda: None
        """After ``restore``: put the generators back (for a checkpoint not part-way through an epoch)."""
        self.owed_evaluation = False
        """After ``restore`` of a checkpoint part-way through an epoch: whether the evaluation after
        its step is still to run (a stop cut it), before training goes on (``run_owed_evaluation``)."""
        self._resume_rng: Mapping[str, Any] | None = None
        """The generators a restored part-way epoch goes on with, once the loader has skipped the
        windows trained: the checkpoint's, or those after an owed evaluation ran again."""

    def attach(self, engine: TraintelEngine) -> None:
        """Add the handlers; attach after the telemetry and the evaluation, so that a checkpoint at
        an epoch's end comes after its epoch and evaluation records."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        if self.every_steps is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._step_ended)
        if self.best is not None:  # an evaluation after a step (``eval.every_steps``)
            engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: self.keep_best())
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_ended)

    def _epoch_started(self, _engine: TraintelEngine) -> None:
        self._ended = False
        self._cut = None

    def _step_ended(self, engine: TraintelEngine) -> None:
        progress, length = engine.state.progress, engine.state.epoch_length
        if length is not None and progress.windows >= length:
            return  # the epoch's last step: its checkpoint comes after the epoch's end
        if self._steps_due(progress.run_steps):
            self.save("every_steps")

    def _steps_due(self, steps: int) -> bool:
        return self.every_steps is not None and steps % self.every_steps == 0

    def epoch_ended(self, engine: TraintelEngine) -> None:
        """EPOCH_COMPLETED, after the epoch's record and evaluation (or the end a restored checkpoint
        owed, ``Plan.finish_owed_end``): the epoch is done, though a stop may have cut its evaluation,
        which is then owed. Its checkpoint is taken when one is due, and after an owed end was run
        again at the checkpoint's step, since that checkpoint still owes it."""
        self._ended = True
        self._cut = self.unfinished_end()
        self.keep_best()
        finished, self.owed = self.owed is not None, None
        steps = engine.state.progress.run_steps
        if self.every_epochs is not None and engine.state.epoch % self.every_epochs == 0:
            self.save("every_epochs", again=finished)
        elif self._steps_due(steps) or finished:
            self.save("every_steps", again=finished)

    def state(self) -> dict[str, Any]:
        """Everything an exact continuation needs, as tensors and plain values."""
        engine = self.trainer
        st = traintel_state(engine)
        progress = st.progress
        # the windows trained, not those the loader yielded: one fetched when a stop came is not done
        loader = None if self._ended else {**self.data.state_dict(), "yielded": progress.windows}
        # an evaluation a stop cut: at an epoch's end (``epoch_ended``), or after a step part-way
        cut = self._cut if self._ended else self.unfinished_end()
        return {
            "format": checkpoint.FORMAT,
            **self.identity,
            "step": progress.run_steps,
            "epoch_ended": self._ended,
            "evaluation_owed": cut is not None,
            "engine": {"iteration": st.iteration, "epoch": st.epoch, "epoch_length": st.epoch_length},
            **self._whole_state(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "progress": progress.state_dict(),
            "loader": loader,
            "rng": {
                **(cut if cut is not None else rng.capture()),
                "loader": [g.get_state() for g in rng.loader_generators(self.data.loader)],
            },
        }

    def _whole_state(self) -> dict[str, Any]:
        """The model and optimizer for the state file: in one process; under torchrun they go into
        the checkpoint's DCP directory instead (``shards``)."""
        if self.shards is not None:
            return {}
        return {"model": unwrapped(self.model).state_dict(), "optimizer": self.optimizer.state_dict()}

    def save(self, why: str, *, again: bool = False) -> bool:
        """Commit a checkpoint of the current step (every rank at the same step); False when none
        was written. A step is saved once unless ``again`` (its position has changed since). A write
        error is logged and leaves the earlier checkpoints as they were. With ``background``, the
        checkpoint is under way on return (True), and counts once ``settle`` has seen it complete."""
        step = traintel_state(self.trainer).progress.run_steps
        if step == self.saved_step and not again:
            return False
        self.settle()
        ok = self.commit_ready()
        if not ok:
            _log.warning(
                "no checkpoint at step %d: the diagnostic file cannot write its records now, or did not "
                "within 5 s",
                step,
            )
        if self.shards is not None and not self.coordinator.all_true(ok):  # DCP writes on every rank
            return False
        write = Write(step, why, self.background)
        self.saved_step, self._pending = step, write
        if self.shards is None:
            write.future = self._write_whole(write) if ok else _failed(NotReady())
        else:
            write.future = self._write_sharded(write)
        write.stall = time.perf_counter() - write.started
        return True if self.background else self.settle()

    def _write_whole(self, write: Write) -> concurrent.futures.Future[Any]:
        """This rank's checkpoint in one state file, model and optimizer included."""
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            path = checkpoint.write(self.directory, write.step, self.rank, self.state())
            write.wrote(path.stat().st_size)
            done.set_result(None)
        except OSError as exc:
            done.set_exception(exc)
        return done

    def _write_sharded(self, write: Write) -> concurrent.futures.Future[Any]:
        """The model and optimizer into the step's DCP directory (every rank together), then this
        rank's state file and manifest; in the background with ``background``."""
        assert self.shards is not None
        state = self.state()
        directory, rank, world_size, step = self.directory, self.rank, self.coordinator.world_size, write.step
        with contextlib.suppress(FileNotFoundError):  # an earlier attempt's of this step goes first
            (directory / layout.manifest_name(step, rank)).unlink()

        def then(written: sharded.Written) -> None:
            path = checkpoint.write(directory, step, rank, state, world_size=world_size, shards=written)
            write.wrote(written.size + path.stat().st_size)

        try:
            return self.shards.save(
                directory / layout.shards_name(step), background=write.background, then=then
            )
        except Exception as exc:  # the disk's, DCP's (ShardError)
            return _failed(exc)

    def settle(self, *, agree: bool = True) -> bool:
        """Wait for the checkpoint under way (written in the background, or just written) to be on
        disk with its manifests; when every rank's is (``agree``: one collective, which also adds up
        their bytes), prune the older ones and emit its ``checkpoint`` record. False when it failed
        on some rank (logged here); nothing to wait for is True. Without ``agree`` (a run that failed:
        other ranks may be gone), only wait."""
        write, self._pending = self._pending, None
        if write is None:
            return True
        waited = time.perf_counter()
        written = True
        try:
            write.future.result()
        except NotReady:  # save has said why
            written = False
        except Exception as exc:  # the disk's, DCP's (ShardError)
            _log.error("checkpoint at step %d (%s) not written: %s", write.step, write.why, one_line(exc))
            written = False
        write.stall += time.perf_counter() - waited if write.background else 0.0
        if not agree:
            return written
        ranks, size = self.coordinator.sum_floats([float(written), float(write.size if written else 0)])
        if ranks < self.coordinator.world_size:
            if self.saved_step == write.step:  # not saved: a later save of this step (a stop's) tries again
                self.saved_step = None
            return False
        checkpoint.prune(self.directory, self.rank, self.keep)
        self._emit(write, int(size))
        return True

    def _emit(self, write: Write, size: int) -> None:
        """The ``checkpoint`` record of a write complete on every rank."""
        c = self.coordinator
        self.emit(CheckpointRecord(
            run_id=self.identity["run_id"], time=time.time(), rank=c.rank, world_size=c.world_size,
            attempt=self.identity["attempt"], step=write.step, epoch=self.trainer.state.epoch,
            reason=write.why, size_bytes=size, write_seconds=write.seconds, stall_seconds=write.stall,
            background=write.background,
        ))  # fmt: skip

    def keep_best(self) -> None:
        """After an evaluation: when the newest of ``best.split`` is strictly better than the best so
        far, write its checkpoint (``checkpoint.write_best``) and log it. A write error is logged and
        leaves the earlier best, whose value later evaluations are then compared with."""
        best = self.best
        record = traintel_state(self.trainer).evaluated.get(best.split) if best is not None else None
        if best is None or record is None or record is self._judged:
            return
        self._judged = record
        value = best.value(record)
        if value is None or not best.better(value, self.best_value):
            return
        write = Write(record.step, "best", background=False)
        try:
            found = self._write_best(best, value, record)
            write.wrote(found.size + sum(shard.size for shard in found.shards))
        except Exception as exc:  # the disk's, or DCP's (ShardError)
            _log.error("best checkpoint at step %d not written: %s", record.step, one_line(exc))
        write.stall = time.perf_counter() - write.started
        ranks, size = self.coordinator.sum_floats([float(write.size > 0), float(write.size)])
        if not write.size:
            return
        if ranks == self.coordinator.world_size:
            self._emit(write, int(size))
        self.best_value = value
        _log.info(
            "new best checkpoint at step %d: %s = %r on %r (%s), in %s",
            record.step, best.metric, value, best.split, best.mode, found.path,
        )  # fmt: skip

    def _write_best(self, best: BestOf, value: float, record: EvalRecord) -> checkpoint.Best:
        """The best checkpoint of ``record``'s evaluation; under torchrun its model and optimizer go
        into a DCP directory first, numbered alike on every rank."""
        sequence, written = None, None
        if self.shards is not None:
            self.settle()  # DCP's group takes one write at a time
            sequence = max(self.coordinator.gather(checkpoint.next_best(self.directory, self.rank)))
            where = self.directory / layout.BEST_DIRECTORY / layout.best_shards_name(sequence)
            written = self.shards.save(where).result()
        return checkpoint.write_best(
            self.directory, self.rank, self.state(), metric=best.metric, split=best.split, mode=best.mode,
            value=value, step=record.step, epoch=record.epoch, sequence=sequence,
            world_size=self.coordinator.world_size, shards=written,
        )  # fmt: skip

    def read_best(self) -> None:
        """On resume: take the best so far from the complete best checkpoint, so that only a better
        evaluation replaces it. One kept for another metric, split or mode is not compared with: the
        next evaluation replaces it."""
        best = self.best
        found = checkpoint.best(self.directory, self.rank) if best is not None else None
        if best is None or found is None:
            return
        if (found.metric, found.split, found.mode) != (best.metric, best.split, best.mode):
            _log.warning(
                "the best checkpoint at step %d is of %s on %r (%s), not of %s on %r (%s): the next "
                "evaluation replaces it",
                found.step, found.metric, found.split, found.mode, best.metric, best.split, best.mode,
            )  # fmt: skip
            return
        self.best_value = found.value

    def save_on_stop(self) -> None:
        """A checkpoint of the step a stop finished, with ``on_signal``. A failure other than a
        non-finite loss found delivering its records is logged: the run still ends as terminated."""
        if not self.on_signal or not traintel_state(self.trainer).progress.run_steps:
            return
        try:
            self.save("signal")
        except NonFiniteLoss:
            raise
        except Exception:
            _log.exception("the checkpoint on stopping failed")

    def restore(self, state: Mapping[str, Any], max_epochs: int) -> None:
        """Continue the run from ``state`` (a checkpoint loaded by ``checkpoint.newest``).

        The model, optimizer, scheduler, progress and Ignite's counters are set at once; the
        generators are put back when the next pass over the data begins (after the loader has
        skipped the windows already trained on), or when the run starts for a checkpoint taken at
        an epoch's end (``restore_rng``, which ``Run.run`` calls). ``owed`` says what of the epoch's
        end is still to run: its evaluation, cut by a stop; for a checkpoint an earlier traintel took
        at an epoch's last step before its end, that end's record too.
        """
        if "model" in state:  # one process's, or an earlier traintel's under torchrun (format 1)
            unwrapped(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        elif self.shards is not None:
            self.shards.load(state["shards"])
        else:
            msg = "its model and optimizer are sharded (a run under torchrun): resume it under torchrun"
            raise ValueError(msg)
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.grad_scaler is not None and state.get("grad_scaler") is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        traintel_state(self.trainer).progress.load_state_dict(state["progress"])
        engine = state["engine"]
        self.owed = owed_end(state)
        ended = bool(state["epoch_ended"]) or self.owed is not None  # its windows all trained
        # Ignite's counters, set here and nowhere else. Not through Engine.load_state_dict: it needs
        # the epoch's length, which an iterable without one has only after its first epoch ends.
        # The epochs done count an epoch whose windows were all trained (its end is owed or was run).
        st = self.trainer.state
        st.iteration, st.epoch_length, st.max_epochs = engine["iteration"], engine["epoch_length"], max_epochs
        st.epoch = engine["epoch"] if ended else engine["epoch"] - 1
        self.saved_step = state["step"]
        saved_rng = state["rng"]
        if ended:
            self._ended = True
            # the next pass draws from the loader's generators as they were at the checkpoint (set
            # now: nothing draws from them before the run starts) and from the global ones
            rng.set_loader_generators(self.data.loader, saved_rng["loader"])
            self.restore_rng = lambda: rng.restore(saved_rng)
        else:
            self.owed_evaluation = bool(state.get("evaluation_owed", False))
            self._resume_rng = saved_rng
            self.data.load_state_dict(state["loader"], after=self._restore_resume_rng)

    def _restore_resume_rng(self) -> None:
        if self._resume_rng is not None:
            rng.restore(self._resume_rng)

    def run_owed_evaluation(self, evaluate: Callable[[], None]) -> None:
        """Run the evaluation a restored part-way checkpoint owes, drawing from the generators as they
        were when the cut one began; training then goes on with the generators as it left them."""
        self.owed_evaluation = False
        if self._resume_rng is not None:
            rng.restore(self._resume_rng)
        evaluate()
        self._resume_rng = rng.capture()
        self.keep_best()


@dataclass(frozen=True)
class OwedEnd:
    """What of a restored checkpoint's epoch end is still to run before the next epoch."""

    record: bool
    """The epoch's record (``train.epoch``): only for a checkpoint taken before its epoch's end."""
    evaluation: bool
    """The epoch's evaluation (``eval.epoch``), when the run evaluates."""


def owed_end(state: Mapping[str, Any]) -> OwedEnd | None:
    """What of the epoch end a checkpoint stands in is still to run: the evaluation a stop cut; for
    a checkpoint an earlier traintel took at an epoch's last step before its end, that end's record
    too (unless it was logged before a stop cut the evaluation). None when nothing is owed."""
    if state["epoch_ended"]:
        return OwedEnd(record=False, evaluation=True) if state.get("evaluation_owed", False) else None
    logged = bool(state.get("epoch_logged", False))
    length = state["engine"]["epoch_length"]
    if logged or (length is not None and state["progress"].get("windows", 0) >= length):
        return OwedEnd(record=not logged, evaluation=True)
    return None


def epochs_done(state: Mapping[str, Any]) -> int:
    """The epochs a checkpoint's run has trained and fully ended: the epoch it stands in counts
    unless part of its end is owed (``owed_end``), which a resumed run runs first."""
    epoch = int(state["engine"]["epoch"])
    return epoch if state["epoch_ended"] and owed_end(state) is None else epoch - 1


class Write:
    """A checkpoint under way: what it is, its write, and what it cost."""

    def __init__(self, step: int, why: str, background: bool) -> None:
        self.step, self.why, self.background = step, why, background
        self.started = time.perf_counter()
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        """Done once this rank's files and manifest are on disk (with the failure, if any)."""
        self.size = 0
        """The bytes this rank wrote."""
        self.seconds = 0.0
        """From the start of the checkpoint to this rank's manifest on disk."""
        self.stall = 0.0
        """How long training waited for it on this rank: the whole write, or for one in the background
        the copy of its state and any wait for it to end (``settle``)."""

    def wrote(self, size: int) -> None:
        """This rank's files and manifest are on disk: ``size`` bytes."""
        self.size, self.seconds = size, time.perf_counter() - self.started


class NotReady(Exception):
    """A checkpoint not written because its records were not durable (``commit_ready``)."""


def _failed(exc: BaseException) -> concurrent.futures.Future[Any]:
    done: concurrent.futures.Future[Any] = concurrent.futures.Future()
    done.set_exception(exc)
    return done
