"""The Python API: build a run (an Ignite trainer with traintel attached), then run it."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any, BinaryIO

import torch
from ignite.engine import Engine, Events

from traintel.config import Config, coerce_config
from traintel.engine import ddp, rng
from traintel.engine.coordination import Coordinator, ProcessGroupCoordinator
from traintel.engine.evaluator import create_evaluator
from traintel.engine.shards import set_epoch, shard
from traintel.engine.step import AccumulatingStep, default_count_items, default_prepare
from traintel.engine.trainer import TraintelEngine, create_trainer
from traintel.engine.windows import WindowedLoader
from traintel.errors import ConfigError, NonFiniteLoss, one_line, signal_exit
from traintel.handlers.evaluation import EvaluateEachEpoch
from traintel.handlers.lifecycle import RunLifecycle
from traintel.handlers.telemetry import TrainTelemetry
from traintel.records import RunEndRecord, RunStartRecord, freeze
from traintel.run import checkpoint, distributed, layout, resume, rundir
from traintel.run.assembly import build_sinks
from traintel.run.checkpointing import Checkpointing
from traintel.run.distributed import Launch, shared_run_id
from traintel.run.optim import build_optimizer, build_scheduler
from traintel.run.signals import early_signal, handled, hold_early, on_early_exit
from traintel.sinks.base import RunContext, Sink
from traintel.sinks.io.dirs import missing_dirs, remove_empty
from traintel.sinks.json.logs import route_stdlib_logging
from traintel.task import Task, check_task, make_task

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


def new_run_id(name: str) -> str:
    """``<name slug>-<UTC yyyymmddThhmmssZ>-<6 hex>``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "run"
    return f"{slug}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device", "cuda was asked for but no CUDA device is available; use auto or cpu"
        )
    return torch.device(choice)


class Run:
    """One configured run: ``trainer`` is a real Ignite Engine with traintel's handlers attached.

    Attach your own Ignite handlers to ``trainer`` (or ``evaluator``), then call
    ``run()``. The sinks are open from construction; ``run()`` closes them at the
    end, and ``close()`` (or leaving a ``with`` block) closes them if it never ran.
    """

    @functools.cached_property
    def _config_text(self) -> str:
        """``config.yaml``'s text (``rundir.config_text``), made once for the check and the file."""
        return rundir.config_text(self.config)

    @property
    def _keeps_files(self) -> bool:
        """Whether the run keeps files in its run directory (the diagnostic file, checkpoints), and
        so config.yaml too."""
        return self.config.sinks.diagnostic.enabled or self.checkpointing is not None

    late_signal: str | None = None
    """A stop signal that came after ``run.end``: the run cut its push and the exporter's linger
    short, and the process that runs it should leave as soon as ``run()`` returns."""

    _run_file: Path | None = None
    """``checkpoints/run.json`` while this first attempt has written it and not started (see
    ``_note_attempt``); ``close`` removes it then."""

    def __init__(
        self,
        config: Config,
        task: Task,
        *,
        device: torch.device,
        extra_sinks: Sequence[Sink] = (),
        json_stream: BinaryIO | None = None,
        launch: Launch | None = None,
        backend: str | None = None,
        must_resume: bool = False,
    ) -> None:
        self.config = config
        self.task = task
        self.device = device
        self.launch = launch
        """Where this process sits in a torchrun job; None for a run of one process."""
        self.backend = backend
        self.coordinator = ProcessGroupCoordinator(device) if launch is not None else Coordinator()
        rank = self.coordinator.rank
        run_id = config.run.id or new_run_id(config.run.name)
        self.run_id = run_id if launch is None or config.run.id else shared_run_id(launch, run_id)
        self.run_dir = Path(config.run.dir or os.path.join("runs", self.run_id))
        self.stop_signal: str | None = None
        self._made_dirs: list[Path] = []
        self._lock = self._lock_run_dir(config, must_resume)
        try:
            found = self._earlier_attempt(task, must_resume)
            self.attempt = 0 if found is None else found.attempt
            """0 for a run's first attempt; n for the n-th attempt in the same run directory."""
            self.resumed_from_step = None if found is None else found.step
            """The optimizer step of the checkpoint this attempt continues from, if any."""
            val_loader = self._make_engines(task)
            self.checkpointing = self._checkpointing(task, None if found is None else found.state)

            built = build_sinks(
                config.sinks,
                extra=extra_sinks,
                json_stream=json_stream,
                rank=rank,
                stdout_ranks=config.telemetry.ranks,
                local_rank=launch.local_rank if launch is not None else 0,
            )
            self.fanout, self.json_sink, self.prometheus = built.fanout, built.json, built.prometheus
            self._logs = built.logs
            if self.json_sink is not None and self.json_sink.console:
                self._attach_progress_bar()  # first, so the bar closes before an epoch's lines are printed
            emit = self.fanout.emit
            self.telemetry = TrainTelemetry(
                emit,
                self.run_id,
                every=config.telemetry.every,
                max_delay=config.telemetry.max_delay_seconds,
                emit_many=self.fanout.emit_many,
                coordinator=self.coordinator,
                attempt=self.attempt,
                on_nonfinite=config.trainer.on_nonfinite,
            )
            self.lifecycle = RunLifecycle(
                emit,
                self._start_record,
                self.run_id,
                rank=rank,
                world_size=self.coordinator.world_size,
                attempt=self.attempt,
            )
            self.evaluation = self._attach_handlers(val_loader)

            context = RunContext(
                run_id=self.run_id,
                name=config.run.name,
                run_dir=self.run_dir,
                config=freeze(config.to_dict(redact=True)),
                rank=rank,
                world_size=self.coordinator.world_size,
                attempt=self.attempt,
            )
            hold_early()  # from here a signal is noted, and the run starts and ends at once as terminated
            self._open_run_dir(found, context)
        except BaseException:
            self._unlock_run_dir()
            raise

        self._unroute: Callable[[], None] | None = None
        if self._logs is not None:
            if self._logs is not self.json_sink:
                self._logs.open(context)
            self._unroute = route_stdlib_logging(self._logs)

    def _attach_handlers(self, val_loader: Iterable[Any] | None) -> EvaluateEachEpoch | None:
        """The telemetry, the evaluation (returned), the checkpoints and the stop at an epoch's end,
        in the order their records must come at an epoch's end."""
        self.telemetry.attach(self.trainer)
        evaluation = None
        if self.evaluator is not None and val_loader is not None:
            evaluation = EvaluateEachEpoch(
                self.evaluator,
                val_loader,
                self.fanout.emit,
                self.run_id,
                self.coordinator,
                attempt=self.attempt,
            )
            evaluation.attach(self.trainer)
        if self.checkpointing is not None:
            if evaluation is not None:
                cut = evaluation
                self.checkpointing.unfinished_end = lambda: cut.unfinished
            self.checkpointing.attach(self.trainer)  # after the epoch and evaluation records
        self.trainer.add_event_handler(Events.EPOCH_COMPLETED, self._stop_after_epoch_end)
        return evaluation

    def _make_engines(self, task: Task) -> Iterable[Any] | None:
        """The optimizer, scheduler, windows, trainer and evaluator; returns this rank's validation data."""
        config, device, launch = self.config, self.device, self.launch
        tc = config.trainer
        model = self.model = task.model.to(device)
        self.optimizer = build_optimizer(tc.optimizer, (p for p in model.parameters() if p.requires_grad))
        train_loader = task.train_loader
        val_loader = task.val_loader
        windows: int | None = None
        if launch is not None:
            train_loader, val_loader = self._shard(train_loader, val_loader)
            windows = distributed.max_over_ranks(
                len(WindowedLoader(train_loader, tc.accumulation_steps)), device
            )
        self.data = WindowedLoader(train_loader, tc.accumulation_steps, windows=windows)
        self.epoch_length = self.data.__len__() if self.data.batches_per_epoch() is not None else None
        if self.epoch_length == 0:
            raise ConfigError(
                "task.train_loader", "has no batches (its length is 0): there is nothing to train"
            )
        total = self.epoch_length * tc.max_epochs if self.epoch_length is not None else None
        self.scheduler = build_scheduler(tc.scheduler, self.optimizer, total)
        prepare = task.prepare or default_prepare
        count_items = task.count_items or default_count_items
        self.trainer: TraintelEngine = create_trainer(
            model if launch is None else ddp.wrap(model, device),
            task.loss_fn,
            self.optimizer,
            self.scheduler,
            device=device,
            prepare=prepare,
            count_items=count_items,
            grad_clip_norm=tc.grad_clip_norm,
            report_grad_norm=tc.report_grad_norm,
            precision=tc.precision,
            coordinator=self.coordinator,
            step_class=AccumulatingStep if launch is None else ddp.DistributedStep,
            on_nonfinite=tc.on_nonfinite,
        )
        if windows and not self.data.batches_per_epoch():  # this rank's share is empty, the others' not
            self._stand_in(task.train_loader, count_items)
        self.trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: set_epoch(train_loader, e.state.epoch))
        self.evaluator: Engine | None = None
        if val_loader is not None:
            self.evaluator = create_evaluator(
                model,
                task.loss_fn,
                device=device,
                prepare=prepare,
                count_items=count_items,
                precision=tc.precision,
            )
        return val_loader

    def _earlier_attempt(self, task: Task, must_resume: bool) -> resume.Resumption | None:
        """With ``run.resume: auto``, the earlier attempt in ``run.dir`` this one continues (its run id
        and attempt number are then this run's), after checking that the maths is unchanged and that
        a configured ``run.id`` is that run's."""
        cfg = self.config
        if cfg.run.resume != "auto":
            directory = self.run_dir / layout.CHECKPOINT_DIRECTORY
            if cfg.checkpoint.enabled and checkpoint.complete(directory, self.coordinator.rank):
                raise ConfigError(
                    "run.dir",
                    f"{str(self.run_dir)!r} holds an earlier run's checkpoints; continue it with "
                    "'traintel train --resume' or run.resume=auto, or choose another run.dir",
                )
            return None
        if cfg.run.dir is None:
            raise ConfigError("run.resume", "auto needs a fixed run.dir, where the checkpoints are kept")
        if not must_resume and not cfg.checkpoint.enabled:
            raise ConfigError(
                "run.resume", "auto needs checkpoints: set checkpoint.every_steps or checkpoint.every_epochs"
            )
        found = resume.find(self.run_dir, self.coordinator, required=must_resume)
        if found is None:
            return None
        if cfg.run.id is not None and cfg.run.id != found.run_id:  # the run keeps its id: refuse, not ignore
            raise ConfigError(
                "run.id",
                f"cannot change when resuming the run in {str(self.run_dir)!r}: its id is {found.run_id!r}, "
                f"this attempt {cfg.run.id!r}; leave run.id null or set it to {found.run_id!r}",
            )
        self.run_id = found.run_id
        if found.state is not None:
            resume.check_settings(found.state["settings"], self._settings(task), self.run_dir)
        else:
            self._refuse_completed()  # it completed before its first checkpoint
        return found

    def _refuse_completed(self) -> None:
        """A ConfigError when the run trained all of ``trainer.max_epochs`` already (``run.json`` says
        so, where its last checkpoint may be older than its end)."""
        max_epochs = self.config.trainer.max_epochs
        completed = resume.completed(self.run_dir, self.coordinator)
        if completed is not None and completed[1] >= max_epochs:
            raise ConfigError(
                "trainer.max_epochs",
                f"the run completed its {completed[1]} epochs at step {completed[0]}, which reaches "
                f"max_epochs {max_epochs}; raise trainer.max_epochs to train on",
            )

    def _settings(self, task: Task) -> dict[str, Any]:
        batch_size = getattr(task.train_loader, "batch_size", None)
        return resume.fixed_settings(
            self.config, self.coordinator.world_size, batch_size if isinstance(batch_size, int) else None
        )

    def _checkpointing(self, task: Task, state: dict[str, Any] | None) -> Checkpointing | None:
        """The checkpoints' handler when checkpoints are on or this attempt resumes (restored then)."""
        cc = self.config.checkpoint
        if not cc.enabled and state is None:
            return None
        handler = Checkpointing(
            self.run_dir / layout.CHECKPOINT_DIRECTORY,
            trainer=self.trainer,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            data=self.data,
            identity={"run_id": self.run_id, "attempt": self.attempt, "settings": self._settings(task)},
            keep=cc.keep,
            every_steps=cc.every_steps,
            every_epochs=cc.every_epochs,
            commit_ready=self._records_written,
            coordinator=self.coordinator,
        )
        if state is not None:
            self._restore(handler, state)
        return handler

    def _restore(self, handler: Checkpointing, state: dict[str, Any]) -> None:
        """Continue from a checkpoint; a run it already finished (``max_epochs``) is a ConfigError."""
        max_epochs = self.config.trainer.max_epochs
        engine = state["engine"]
        done = engine["epoch"] if state["epoch_ended"] else engine["epoch"] - 1
        if done >= max_epochs:
            raise ConfigError(
                "trainer.max_epochs",
                f"the checkpoint at step {state['step']} has {done} epochs done, which reaches "
                f"max_epochs {max_epochs}; raise trainer.max_epochs to train on",
            )
        self._refuse_completed()
        try:
            handler.restore(state, max_epochs)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ConfigError(
                "run.resume", f"the checkpoint at step {state['step']} does not fit this run: {one_line(exc)}"
            ) from None

    def _records_written(self) -> bool:
        """Deliver the waiting records and make them durable in the diagnostic file (written and
        fsynced, waiting up to 5 s); False at once while it cannot write. Stdout is not waited
        for: a reader that does not read cannot hold training. Without a diagnostic file: True."""
        self.telemetry.flush()
        return self.fanout.durable(5.0)

    def _shard(
        self, train: Iterable[Any], val: Iterable[Any] | None
    ) -> tuple[Iterable[Any], Iterable[Any] | None]:
        """This rank's share of the training and validation data (``traintel.engine.shards.shard``)."""
        c = self.coordinator

        def share(loader: Iterable[Any], key: str) -> Iterable[Any]:
            try:
                return shard(loader, c.rank, c.world_size, self.config.run.seed)
            except ValueError as exc:
                raise ConfigError(key, str(exc)) from None

        train = share(train, "task.train_loader")
        if not isinstance(train, Sized):
            raise ConfigError(
                "task.train_loader", "needs a length in a run of several ranks (they step together)"
            )
        return train, None if val is None else share(val, "task.val_loader")

    def _stand_in(self, loader: Iterable[Any], count_items: Callable[[Any], int]) -> None:
        """Give a rank whose share of the training data is empty a batch to join each step's gradient
        reduction with (``ddp.DistributedStep.take_part``: a pass of zero weight): the first batch
        with items of rank 0's share, read with every generator put back afterwards, so that what
        this rank draws later is as if it had read nothing. A loader the task shards itself gives
        none here: the step then fails, naming the empty rank."""
        c = self.coordinator
        first = shard(loader, 0, c.world_size, self.config.run.seed)
        saved, own = rng.capture(), [g.get_state() for g in rng.loader_generators(first)]
        try:
            batch = next((b for b in first if count_items(b)), None)
        finally:
            rng.set_loader_generators(first, own)
            rng.restore(saved)
        step = self.trainer._process_function
        if batch is not None and isinstance(step, ddp.DistributedStep):
            step.example = batch

    def _attach_progress_bar(self) -> None:
        """A tqdm bar (Ignite's ProgressBar, on stderr) with the step loss, refreshed at the telemetry
        cadence, so the terminal view syncs with the device no more often than emission does."""
        from ignite.handlers import ProgressBar

        every = self.config.telemetry.every
        ProgressBar(persist=True).attach(
            self.trainer,
            output_transform=lambda loss: {"loss": float(loss)},
            event_name=Events.ITERATION_COMPLETED(every=every),
        )

    def _lock_run_dir(self, config: Config, must_resume: bool) -> rundir.RunDirLock | None:
        """Create the run directory and, for a run that keeps files there, take its lock on rank 0
        before anything in it is read or written (``rundir.lock``); under torchrun the ranks agree,
        so all stop with the first rank's error. The directories made are removed again when the
        run never starts (``_unlock_run_dir``)."""
        self._made_dirs = missing_dirs(self.run_dir)
        made = self._made_dirs
        on_early_exit(lambda: remove_empty(made))  # a signal ending the start-up leaves none behind
        held: rundir.RunDirLock | ConfigError | None = None
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            held = ConfigError("run.dir", f"cannot create {str(self.run_dir)!r}: {exc.strerror}")
        else:
            keeps_files = config.sinks.diagnostic.enabled or config.checkpoint.enabled or must_resume
            if keeps_files and self.coordinator.rank == 0:
                held = rundir.lock(self.run_dir)
        try:
            self._agree(held if isinstance(held, ConfigError) else None)
        except ConfigError:
            if isinstance(held, rundir.RunDirLock):
                held.release()
            remove_empty(self._made_dirs)
            raise
        return held if isinstance(held, rundir.RunDirLock) else None

    def _unlock_run_dir(self) -> None:
        """Release the run directory's lock, and remove the directories this run made that stayed empty."""
        held, self._lock = self._lock, None
        if held is not None:
            held.release()
        remove_empty(self._made_dirs)

    def _open_run_dir(self, found: resume.Resumption | None, context: RunContext) -> None:
        """Check the run directory, note the attempt and open the sinks; on failure, the note is
        removed again. Sinks may write into the directory from ``open()``; one that stays empty is
        removed again at ``close``."""
        try:
            self._check_run_dir(found)  # before any sink writes into it
            self._note_attempt()
            self.fanout.open(context)
        except BaseException:
            self._forget_attempt()
            raise

    def _note_attempt(self) -> None:
        """Rank 0 of a run that keeps checkpoints writes ``checkpoints/run.json`` (run id, attempt)
        before any sink writes a file: a process killed from here on leaves a directory that
        ``run.resume=auto`` continues, never one that looks like another run's."""
        if self.checkpointing is None or self.coordinator.rank != 0:
            return
        directory = self.checkpointing.directory
        made = missing_dirs(directory)
        resume.write_run_file(directory, self.run_id, self.attempt)
        if self.attempt == 0:
            self._run_file = directory / layout.RUN_FILE
            self._made_dirs = [*made, *self._made_dirs]

    def _forget_attempt(self) -> None:
        """Remove the run.json this first attempt wrote, when it never started."""
        run_file, self._run_file = self._run_file, None
        if run_file is not None:
            with contextlib.suppress(OSError):
                run_file.unlink()

    def _check_run_dir(self, found: resume.Resumption | None) -> None:
        """ConfigError, before any sink opens, when this run must not write into ``run.dir``
        (``rundir.problem``). Every rank checks; under torchrun the ranks agree, so all stop with
        the first rank's error."""
        diagnostic = self.config.sinks.diagnostic
        problem = (
            rundir.problem(
                self.run_dir,
                self.coordinator.rank,
                diagnostic=diagnostic.filename,
                writes_diagnostic=diagnostic.enabled,
                continuing=found is not None,
                config_text=self._config_text,
            )
            if self._keeps_files
            else None
        )
        self._agree(problem)

    def _agree(self, problem: ConfigError | None) -> None:
        """Raise the first rank's problem on every rank (under torchrun each rank checks its own:
        all stop together), or nothing when no rank has one."""
        views = self.coordinator.gather(None if problem is None else (problem.key, problem.problem))
        first = next((view for view in views if view is not None), None)
        if first is not None:
            raise ConfigError(*first)

    def _start_record(self) -> RunStartRecord:
        return RunStartRecord(
            run_id=self.run_id,
            time=time.time(),
            rank=self.coordinator.rank,
            world_size=self.coordinator.world_size,
            attempt=self.attempt,
            name=self.config.run.name,
            run_dir=str(self.run_dir),
            device=str(self.device),
            config=freeze(self.config.to_dict(redact=True)),
            metrics_url=self.prometheus.url if self.prometheus is not None else None,
            backend=self.backend,
            restart_count=self.launch.restart_count if self.launch is not None else 0,
            resumed_from_step=self.resumed_from_step,
            items_total=self.trainer.state.progress.run_items,
        )

    def stop(self, reason: str) -> None:
        """Finish the current optimizer step, then end the run as ``terminated`` with ``reason``.

        The request goes into the next step's agreement, so a window already fetched (or being
        fetched) is trained before the run ends: a checkpoint then holds exactly the windows
        trained. Under torch.distributed every rank finishes that same step and ends (an evaluation
        under way runs to its end on every rank). In one process the run ends at once when no
        window is on its way, and an evaluation under way is cut: its epoch's end runs again when
        the run resumes.
        """
        self.trainer.state.stop_reason = reason
        self.coordinator.stop_requested = True
        if self.coordinator.distributed:
            return
        if self.trainer.last_event_name not in _WINDOW_ON_ITS_WAY:
            self.trainer.terminate()
        if self.evaluation is not None:
            self.evaluation.stop()

    @property
    def _stopping_alone(self) -> bool:
        """A stop was asked for in a run of one process, where it ends the run at the next boundary
        (under torch.distributed the next step's agreement ends it)."""
        return self.coordinator.stop_requested and not self.coordinator.distributed

    def _stop_after_epoch_end(self, engine: Engine) -> None:
        """EPOCH_COMPLETED: in one process, end the run here when a stop was asked for while the
        epoch's last window was fetched (the next epoch's first window would be on its way)."""
        if self._stopping_alone:
            engine.terminate()

    def _on_signal(self, name: str) -> None:
        if self.lifecycle.ended is None:
            if self.stop_signal is not None:  # a second signal while stopping: leave at once
                with contextlib.suppress(OSError):  # os.write: it may interrupt a sys.stderr write
                    os.write(2, f"traintel: {name} while stopping: exiting at once\n".encode())
                os._exit(signal_exit(self.stop_signal))  # the first signal's status
            self.stop_signal = name
            self.stop(name)
            return
        self.late_signal = name  # the run already ended: abandon the push, stop serving, leave
        if self.prometheus is not None:
            self.prometheus.hurry()

    def run(self, stop_signal: str | None = None) -> RunEndRecord:
        """Train for ``trainer.max_epochs``; returns the ``run.end`` record.

        In this order: ``run.start``; ``trainer.run()``, whose handlers (yours included, for
        COMPLETED, TERMINATE and EXCEPTION_RAISED too) all run inside it; the waiting step
        records; exactly one ``run.end``; then the sinks close (the exporter's linger starts
        only then). An exception from training ends the run as ``failed`` and is re-raised
        after that (an EXCEPTION_RAISED handler that does not re-raise it has handled it, as
        in Ignite, and the run goes on as that handler decided).

        ``stop_signal`` names a signal that arrived before the run (while starting up): the
        run then starts, writes ``run.start`` and ends at once as ``terminated``.
        """
        if self.lifecycle.ended is not None:
            msg = "a Run runs once; build a new one"
            raise RuntimeError(msg)
        raised: BaseException | None = None
        with handled(self._on_signal):  # a signal during the linger below cuts it short
            # a signal noted before these handlers took over (also after the caller looked), or one
            # that came before STARTED (trainer.run() resets terminate()), ends the run at once
            noted = stop_signal or early_signal()
            if noted is not None and self.stop_signal is None:
                self.stop_signal = noted
            self.trainer.add_event_handler(
                Events.STARTED, lambda _: None if self.stop_signal is None else self.stop(self.stop_signal)
            )
            try:
                try:
                    if self._keeps_files and self.coordinator.rank == 0:
                        rundir.save_config(self.run_dir, self._config_text, first_attempt=self.attempt == 0)
                    self._run_file = None  # the attempt has started: its run.json stays
                    self.lifecycle.start()
                    self._train()
                except BaseException as exc:
                    raised = exc
                ended = self._end(raised)
            finally:
                self.close()
        if raised is not None:
            raise raised
        return ended

    def _checkpoint_on_stop(self) -> None:
        """A checkpoint of the step a stop request (a signal) finished, when ``checkpoint.on_signal``."""
        cc, cp = self.config.checkpoint, self.checkpointing
        if cp is None or not (cc.enabled and cc.on_signal) or not self.trainer.state.progress.run_steps:
            return
        try:
            cp.save("signal")
        except NonFiniteLoss:
            raise
        except Exception:  # the run still ends as terminated; the failure is logged
            logging.getLogger("traintel").exception("the checkpoint on stopping failed")

    def _train(self) -> None:
        """``trainer.run()``; a resumed attempt first puts back what its checkpoint holds beyond the
        weights (``Checkpointing.restore``): the generators, and an epoch's end still to come."""
        trainer, max_epochs = self.trainer, self.config.trainer.max_epochs
        cp = self.checkpointing
        if cp is not None and self.resumed_from_step is not None:
            cp.restore_rng()
            if cp.pending_end:
                if cp.epoch_logged:
                    self.telemetry.logged_epoch = trainer.state.epoch
                trainer._fire_event(Events.EPOCH_COMPLETED)
                if self._stopping_alone:
                    return  # stopped during that end: it is still to come
                if trainer.state.epoch >= max_epochs:  # that end was all that was left
                    trainer._fire_event(Events.COMPLETED)
                    return
        trainer.run(self.data, max_epochs=max_epochs, epoch_length=self.epoch_length)

    def _end(self, raised: BaseException | None) -> RunEndRecord:
        """Deliver the waiting records, then emit ``run.end`` for how ``trainer.run()`` ended; a run
        stopped by a signal (``stop``) first takes a checkpoint when ``checkpoint.on_signal``."""
        state = self.trainer.state
        if raised is None and state.stop_reason is not None:
            try:
                self._checkpoint_on_stop()
            except NonFiniteLoss as exc:  # found while delivering the records the checkpoint covers
                raised = exc
        if raised is not None:
            # the traceback as a structured log record (a JSON line with an ``exception`` object)
            logging.getLogger("traintel").error("training failed", exc_info=raised)
        try:  # after a failure, other ranks may be gone: no collective then
            self.telemetry.flush(global_sums=raised is None)
        except NonFiniteLoss as exc:  # trainer.on_nonfinite=stop, found in the last steps delivered
            raised = exc
        except Exception:  # the run still gets its run.end; the failure is logged, not raised
            logging.getLogger("traintel").exception("delivering the last records failed")
        if raised is not None:
            status, reason = "failed", one_line(raised)
            if self.launch is not None:  # name the rank the failure came from: one that said so, or one lost
                c = self.coordinator
                distributed.announce_failure(c.rank, reason)
                reason = distributed.failure_reason(c.rank, c.world_size, reason)
        elif self.trainer.should_terminate:
            status, reason = "terminated", state.stop_reason or "terminate() called by a handler"
        else:
            status, reason = "completed", "max_epochs"
        ended = self.lifecycle.end(status, reason, state.progress)
        if status == "completed":
            self._note_completed()
        self._push()
        return ended

    def _note_completed(self) -> None:
        """Rank 0 notes in ``run.json`` that this attempt trained all its epochs, so that resuming
        the run asks for more epochs even where its last checkpoint is older than its end."""
        cp = self.checkpointing
        if cp is None or self.coordinator.rank != 0:
            return
        state = self.trainer.state
        done = {"step": state.progress.run_steps, "epochs": state.epoch}
        try:
            resume.write_run_file(cp.directory, self.run_id, self.attempt, completed=done)
        except OSError as exc:
            logging.getLogger("traintel").warning("run.json not updated: %s", one_line(exc))

    def _push(self) -> None:
        """Push the final values, once ``run.end`` is on stdout and fsynced in the diagnostic file:
        network work comes after the records are safe. A failed or abandoned push is a
        ``sink.error`` (it follows ``run.end``)."""
        if self.prometheus is None or self.prometheus.pushgateway is None:
            return
        self.fanout.sync(2.0)
        try:
            self.prometheus.push()
        except OSError as exc:
            self.fanout.report(self.prometheus, exc)

    def close(self) -> None:
        """Close the sinks (idempotent); a run directory left empty is removed, as is the run.json of
        a first attempt that never started."""
        self.fanout.close(bounded=True)  # logging still routed: a sink's close that hangs is reported
        self._forget_attempt()
        unroute, self._unroute = self._unroute, None
        if unroute is not None:
            unroute()
        if self._logs is not None and self._logs is not self.json_sink:
            self._logs.close()
        self._unlock_run_dir()
        if self.launch is not None:
            distributed.stop()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build(
    config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    task: Any = None,
    *,
    sinks: Sequence[Sink] = (),
    json_stream: BinaryIO | None = None,
    must_resume: bool = False,
) -> Run:
    """Build a Run from a config (object, mapping, YAML path or None) and optionally a task made in code.

    Without ``task``, ``config.task.factory`` is called with ``config.task.params``.
    ``sinks`` are added after the configured ones. With ``run.resume: auto`` the run continues
    from the newest checkpoint in ``run.dir``; ``must_resume`` makes a missing one a ConfigError.
    """
    cfg = coerce_config(config)
    device = resolve_device(cfg.trainer.device)
    launch = distributed.launch_from_env()
    backend: str | None = None
    if launch is not None:  # started by torchrun: one rank of a process group
        device = distributed.device_for(launch, device)
        backend = distributed.start(cfg.trainer.distributed, device, launch.restart_count)
    try:
        torch.manual_seed(cfg.run.seed)
        if task is not None:
            checked = check_task(task)
        else:
            # stdout carries JSON lines only: until the JSON sink owns it, print() in the factory goes
            # to stderr (from then on the sink turns it into log lines)
            to_stderr = cfg.sinks.json_.enabled and json_stream is None
            with contextlib.redirect_stdout(sys.stderr) if to_stderr else contextlib.nullcontext():
                checked = make_task(cfg.task.factory, cfg.task.params)
        return Run(
            cfg,
            checked,
            device=device,
            extra_sinks=sinks,
            json_stream=json_stream,
            launch=launch,
            backend=backend,
            must_resume=must_resume,
        )
    except BaseException:
        if launch is not None:
            distributed.stop()
        raise


def train(
    config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    task: Any = None,
    *,
    sinks: Sequence[Sink] = (),
    json_stream: BinaryIO | None = None,
) -> RunEndRecord:
    """Build and run in one call; returns the ``run.end`` record."""
    return build(config, task, sinks=sinks, json_stream=json_stream).run()
