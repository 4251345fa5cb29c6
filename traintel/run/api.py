"""The Python API: ``build`` a run (its plan, in its session), then ``Run.run`` it."""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, BinaryIO

from ignite.engine import Events

from traintel.config import Config, coerce_config
from traintel.engine.events import TraintelEvents
from traintel.errors import NonFiniteLoss, one_line, signal_exit
from traintel.records import MetricRecord, RunEndRecord
from traintel.run import distributed, resume, rundir, session
from traintel.run.plan import THREADED_CATCH_UP_SECONDS, Plan, load_task, make_plan
from traintel.run.signals import early_signal, handled, hold_early
from traintel.sinks.base import Sink
from traintel.task import METRIC_NAME, METRIC_NAME_RULE

_WINDOW_ON_ITS_WAY = frozenset(
    (
        Events.EPOCH_STARTED,
        Events.GET_BATCH_STARTED,
        Events.GET_BATCH_COMPLETED,
        Events.DATALOADER_STOP_ITERATION,
    )
)
"""The trainer's last event while the next window is being fetched: a stop then waits for that
window's step (Ignite would end the run right after the fetch, leaving the window untrained)."""
_IN_A_STEP = frozenset((Events.ITERATION_STARTED, Events.ITERATION_COMPLETED, *TraintelEvents))
"""The trainer's last event during a step: a stop in an epoch's last step ends the run after that
epoch's end (its record, its evaluation, its checkpoint), so no checkpoint falls between them."""
_log = logging.getLogger("traintel")


class Run:
    """One built run: ``trainer`` is a real Ignite Engine with traintel's handlers attached.

    Attach your own Ignite handlers to ``trainer`` (or ``evaluator``), then call ``run()``. The
    sinks are open from ``build``; ``run()`` closes them at the end, and ``close()`` (or leaving a
    ``with`` block) closes them if it never ran.
    """

    late_signal: str | None = None
    """A stop signal that came after ``run.end``: the run cut its push and the exporter's linger
    short, and the process that runs it should leave as soon as ``run()`` returns."""
    stop_signal: str | None = None
    """The stop signal that ended the run, if one did."""

    def __init__(self, plan: Plan, resources: contextlib.ExitStack, note: session.AttemptNote) -> None:
        self.plan, self._resources, self._note = plan, resources, note
        self.config, self.task = plan.config, plan.task
        engines = plan.engines
        self.trainer, self.evaluator = engines.trainer, engines.evaluator
        self.model, self.optimizer, self.scheduler = engines.model, engines.optimizer, engines.scheduler
        self.fanout, self.prometheus = plan.sinks.fanout, plan.sinks.prometheus
        self.checkpointing = plan.checkpointing
        self.coordinator, self.run_dir = plan.where.coordinator, plan.run_dir
        self.run_id, self.attempt = plan.attempt.run_id, plan.attempt.attempt
        """The run's id; 0 for a run's first attempt, n for the n-th attempt in the same run directory."""
        self.resumed_from_step = plan.attempt.step
        """The optimizer step of the checkpoint this attempt continues from, if any."""

    def run(self, stop_signal: str | None = None) -> RunEndRecord:
        """Train for ``trainer.max_epochs``; returns the ``run.end`` record.

        In this order: ``config.yaml``; ``run.start``; ``trainer.run()``, whose handlers (yours
        included, for COMPLETED, TERMINATE and EXCEPTION_RAISED too) all run inside it; the waiting
        step records; a checkpoint when a signal stopped it; exactly one ``run.end``; the push;
        then the session closes (the sinks first: the exporter's linger starts only then). An
        exception from training ends the run as ``failed`` and is re-raised after that (an
        EXCEPTION_RAISED handler that does not re-raise it has handled it, as in Ignite).

        ``stop_signal`` names a signal that arrived before the run (while starting up): the run
        then starts, writes ``run.start`` and ends at once as ``terminated``.
        """
        plan = self.plan
        if plan.lifecycle.ended is not None:
            msg = "a Run runs once; build a new one"
            raise RuntimeError(msg)
        raised: BaseException | None = None
        with handled(self._on_signal), self._resources:  # a signal as the sinks close cuts the linger
            # a signal noted before these handlers took over, or one before STARTED (trainer.run()
            # resets terminate()), ends the run at once
            self.stop_signal = self.stop_signal or stop_signal or early_signal()
            plan.trainer.add_event_handler(
                Events.STARTED, lambda _: None if self.stop_signal is None else self.stop(self.stop_signal)
            )
            try:
                if plan.keeps_files and self.coordinator.rank == 0:
                    rundir.save_config(self.run_dir, plan.config_text, first_attempt=self.attempt == 0)
                self._note.started()
                plan.lifecycle.start()
                self._train()
            except BaseException as exc:
                raised = exc
            status, reason, raised = self._outcome(raised)
            self.fanout.catch_up(THREADED_CATCH_UP_SECONDS)  # a threaded sink's failure, before run.end
            ended = plan.lifecycle.end(status, reason, plan.trainer.state.progress)
            if status == "completed":
                session.note_completed(plan)
            session.push_final(plan)
        if raised is not None:
            raise raised
        return ended

    def _train(self) -> None:
        """``trainer.run()``; a resumed attempt first puts back the generators its checkpoint holds
        and runs what of that epoch's end is owed (``Plan.finish_owed_end``)."""
        plan, cp = self.plan, self.checkpointing
        trainer, max_epochs = plan.trainer, self.config.trainer.max_epochs
        if cp is not None and self.resumed_from_step is not None:
            cp.restore_rng()
            plan.finish_owed_end()
            if self.coordinator.stopping or trainer.state.epoch >= max_epochs:
                return  # stopped while finishing it, or it was all that was left
        trainer.run(plan.engines.data, max_epochs=max_epochs, epoch_length=plan.engines.epoch_length)
        if trainer.state.epoch_cut:
            self._end_cut_epoch()

    def _end_cut_epoch(self) -> None:
        """The step limit ended the run part-way through an epoch: that part gets its ``train.epoch``
        record, then, when checkpoints are on, a checkpoint of the last step, from which a run with a
        higher ``trainer.max_steps`` continues the epoch where it was left."""
        self.plan.telemetry.emit_epoch(self.trainer, cut=True)
        if self.checkpointing is not None and self.config.checkpoint.enabled:
            self.checkpointing.save("max_steps")

    def _outcome(self, raised: BaseException | None) -> tuple[str, str, BaseException | None]:
        """The run's status, reason and failure: a stop's checkpoint is taken (when
        ``checkpoint.on_signal``) and the waiting records are delivered first, either of which may
        find a non-finite loss (``trainer.on_nonfinite=stop``) and so fail the run."""
        plan, state = self.plan, self.trainer.state
        cp = self.checkpointing
        try:
            if raised is None and state.stop_reason is not None and cp is not None:
                cp.save_on_stop()
        except NonFiniteLoss as exc:  # found delivering the records the checkpoint covers
            raised = exc
        if cp is not None:  # a checkpoint written in the background is on disk before run.end
            try:
                cp.settle(agree=raised is None)
            except Exception as exc:  # its agreement with the other ranks failed: one was lost
                raised = raised or exc
        if raised is not None:  # the traceback as a structured log record
            _log.error("training failed", exc_info=raised)
        try:  # after a failure, other ranks may be gone: no collective then
            plan.telemetry.flush(global_sums=raised is None)
        except NonFiniteLoss as exc:
            raised = exc
        except Exception:  # the run still gets its run.end; the failure is logged, not raised
            _log.exception("delivering the last records failed")
        if raised is not None:
            reason = one_line(raised)
            if plan.where.launch is not None:  # name the rank the failure came from, or one lost
                c = self.coordinator
                store = plan.where.store
                distributed.announce_failure(store, c.rank, reason)
                reason = distributed.failure_reason(store, c.rank, c.world_size, reason)
                distributed.record_failure(reason)  # for torchrun's summary of the failed workers
            return "failed", reason, raised
        if self.trainer.should_terminate and not self._all_done():
            if state.stop_reason is None:  # a handler's terminate() (EarlyStopping): a finished run
                return "completed", self.trainer.handler_stop or "stopped by a handler", None
            return "terminated", state.stop_reason, None  # a signal, a peer rank's, or stop()
        return "completed", "max_steps" if state.step_limit is not None else "max_epochs", None

    def _all_done(self) -> bool:
        """Whether every epoch was trained and ended, or ``trainer.max_steps`` steps taken, the last
        evaluation included. A stop that comes after that (while the last checkpoint is taken, or
        the last records go out) stopped nothing: the run completed, and a restarted ``run.resume:
        auto`` would find nothing left to do."""
        st = self.trainer.state
        evaluation = self.plan.evaluation
        trained = st.step_limit is not None or (
            st.epoch_length is not None and st.iteration >= st.epoch_length * self.config.trainer.max_epochs
        )
        return trained and (evaluation is None or evaluation.unfinished is None)

    def stop(self, reason: str) -> None:
        """Finish the current optimizer step, then end the run as ``terminated`` with ``reason``.

        The request goes into the next step's agreement, so a window already fetched (or being
        fetched) is trained before the run ends: a checkpoint then holds exactly the windows
        trained; when that step is its epoch's last, the run ends after the epoch's end, so a
        checkpoint never falls between the two. Under torch.distributed every rank finishes that
        same step and ends (an evaluation under way runs to its end on every rank). In one process
        the run ends at once when no window is on its way, and an evaluation under way is cut (or
        one still to come skipped): the resumed run evaluates that epoch first.
        """
        self.trainer.state.stop_reason = reason
        self.coordinator.stop_requested = True
        if self.coordinator.distributed:
            return
        state = self.trainer.state
        in_epochs_last_step = (
            self.trainer.last_event_name in _IN_A_STEP
            and state.epoch_length is not None
            and state.iteration % state.epoch_length == 0
        )
        if self.trainer.last_event_name not in _WINDOW_ON_ITS_WAY and not in_epochs_last_step:
            self.trainer.terminate()  # else after the step, or after the epoch's end it leads to
        if self.plan.evaluation is not None:
            self.plan.evaluation.stop()

    def log(self, values: Mapping[str, Any], *, step: int | None = None) -> MetricRecord:
        """Send values from your own code (a handler, a callback) to every sink as one ``metric``
        record, and return it: ``run.log({"val_bleu": 31.2})``.

        Each name is a letter or ``_``, then up to 63 letters, digits or ``_``; each value a number or
        a one-element tensor (read on the host here: call it where a sync costs nothing, such as an
        epoch's end). ``step`` is the optimizer step the values belong to, by default the steps
        completed so far. The values are this rank's, not reduced over the ranks. The record goes out
        at once, so it may come before the step records still waiting for their delivery (its
        ``step`` places it). Works while the run runs, from ``run.start`` to ``run.end``; a bad name,
        value or step raises ``ValueError`` or ``TypeError`` naming it, and no record is made.
        """
        if not self.plan.lifecycle.running:
            msg = "Run.log works while the run runs: after run.start and before run.end"
            raise RuntimeError(msg)
        state = self.trainer.state
        if step is None:
            step = state.progress.run_steps
        elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
            msg = f"Run.log: step must be an integer >= 0, got {step!r}"
            raise ValueError(msg)
        c = self.coordinator
        record = MetricRecord(
            run_id=self.run_id, time=time.time(), rank=c.rank, world_size=c.world_size, attempt=self.attempt,
            epoch=state.epoch, step=step, metrics=_logged(values),
        )  # fmt: skip
        self.fanout.emit(record)
        return record

    def _on_signal(self, name: str) -> None:
        if self.plan.lifecycle.ended is not None:  # the run ended: abandon the push, stop serving, leave
            self.late_signal = name
            if self.prometheus is not None:
                self.prometheus.hurry()
            return
        if self.stop_signal is not None:  # a second signal while stopping: leave at once
            with contextlib.suppress(OSError):  # os.write: it may interrupt a sys.stderr write
                os.write(2, f"traintel: {name} while stopping: exiting at once\n".encode())
            os._exit(signal_exit(self.stop_signal))  # the first signal's status
        self.stop_signal = name
        self.stop(name)

    def close(self) -> None:
        """Close the session (idempotent): the sinks, the log route, the run directory's lock (a
        directory left empty is removed, as is the run.json of a first attempt that never
        started), the process group."""
        self._resources.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _logged(values: Mapping[str, Any]) -> Mapping[str, float]:
    """``Run.log``'s values as floats by name, checked: a ``ValueError`` or ``TypeError`` names the
    first bad one."""
    import torch

    if not isinstance(values, Mapping) or not values:
        msg = f"Run.log takes a non-empty mapping of names to numbers, got {values!r}"
        raise TypeError(msg)
    out: dict[str, float] = {}
    for name, value in values.items():
        if not (isinstance(name, str) and METRIC_NAME.fullmatch(name)):
            msg = f"Run.log: the name {name!r} must be {METRIC_NAME_RULE}"
            raise ValueError(msg)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[name] = float(value.item())
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            out[name] = float(value)
        else:
            shape = f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""
            kind = f"{type(value).__name__}{shape}"
            msg = f"Run.log: {name!r} is a {kind}; a value is a number or a one-element tensor"
            raise TypeError(msg)
    return MappingProxyType(out)


def build(
    config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    task: Any = None,
    *,
    sinks: Sequence[Sink] = (),
    json_stream: BinaryIO | None = None,
    must_resume: bool = False,
) -> Run:
    """Build a Run from a config (object, mapping, YAML path or None) and optionally a task made in code.

    Without ``task``, ``config.task.factory`` is called with ``config.task.params``. With one, the
    run's config says ``task.factory: null`` (in ``config.yaml``, ``run.start`` and its checkpoints):
    the task is given in code, so only code can resume the run, by building it again with the same
    task, ``run.resume: auto`` and the same ``run.dir``. ``sinks`` are added after the configured ones.
    With ``run.resume: auto`` the run continues from the newest checkpoint in ``run.dir``;
    ``must_resume`` makes a missing one a ConfigError.

    The session's resources are acquired in order (``traintel.run.session``), and a failure at
    any point gives back exactly those acquired, in reverse.
    """
    cfg = coerce_config(config)
    if task is not None:  # no factory makes it: a resume from the command line would need one
        cfg = cfg.model_copy(update={"task": cfg.task.model_copy(update={"factory": None})})
    with contextlib.ExitStack() as stack:
        where = session.acquire_process_group(stack, cfg)
        checked = load_task(cfg, task, stdout_is_json=cfg.sinks.json_.enabled and json_stream is None)
        run_id, run_dir = session.run_identity(cfg, where)
        session.acquire_run_dir(stack, cfg, run_dir, where.coordinator, must_resume=must_resume)
        batch_size = getattr(checked.train_loader, "batch_size", None)
        settings = resume.fixed_settings(
            cfg, where.coordinator.world_size, batch_size if isinstance(batch_size, int) else None
        )
        attempt = resume.decide(cfg, run_dir, run_id, settings, where.coordinator, must_resume=must_resume)
        plan = make_plan(
            cfg,
            checked,
            attempt,
            run_dir,
            where,
            settings=settings,
            extra_sinks=sinks,
            json_stream=json_stream,
        )
        hold_early()  # from here a signal is noted, and the run starts and ends at once as terminated
        session.check_run_dir(plan)  # before any sink writes into it
        note = session.acquire_attempt_note(stack, plan)
        session.acquire_sinks(stack, plan)
        return Run(plan, stack.pop_all(), note)
    raise AssertionError  # unreachable: the block returns or raises


def train(
    config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    task: Any = None,
    *,
    sinks: Sequence[Sink] = (),
    json_stream: BinaryIO | None = None,
) -> RunEndRecord:
    """Build and run in one call; returns the ``run.end`` record."""
    return build(config, task, sinks=sinks, json_stream=json_stream).run()
