"""The run's plan: everything a run is made of, built from the config, the task and the attempt.

``make_plan`` builds the engines (the model on its device, optimizer, scheduler, windows, trainer,
evaluator), the handlers in the order their records must come, and the sinks' objects. It opens
nothing: no file, no port, no stdout capture, no log route, no signal handler (``session`` opens
those). Under torchrun the ranks agree on the number of windows per epoch here (one collective),
and a resumed attempt's checkpoint is put into the model, optimizer and progress.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from ignite.engine import Engine, Events

from traintel.config import Config
from traintel.engine import ddp, rng
from traintel.engine.coordination import Coordinator
from traintel.engine.evaluator import create_evaluator
from traintel.engine.shards import set_epoch, shard
from traintel.engine.step import AccumulatingStep, default_count_items, default_prepare
from traintel.engine.trainer import TraintelEngine, create_trainer
from traintel.engine.windows import WindowedLoader
from traintel.errors import ConfigError, one_line
from traintel.handlers.evaluation import EvaluateEachEpoch
from traintel.handlers.lifecycle import RunLifecycle
from traintel.handlers.telemetry import TrainTelemetry
from traintel.records import RunStartRecord, freeze
from traintel.run import distributed, layout, resume, rundir
from traintel.run.assembly import SinkSet, build_sinks
from traintel.run.checkpointing import Checkpointing
from traintel.run.optim import build_optimizer, build_scheduler
from traintel.sinks.base import RunContext, Sink
from traintel.task import Task, check_task, make_task


@dataclass(frozen=True)
class Where:
    """Where this process runs: its device, its rank's coordinator, its torchrun launch (None for a
    run of one process) and the process group's backend."""

    device: torch.device
    coordinator: Coordinator
    launch: distributed.Launch | None = None
    backend: str | None = None
    store: distributed.KeyValueStore | None = None
    """The process group's key-value store, where a failed rank leaves its reason."""


@dataclass
class Plan:
    """A run's parts, built and connected, nothing opened."""

    config: Config
    task: Task
    where: Where
    attempt: resume.Resumption
    run_dir: Path
    engines: Engines
    sinks: SinkSet
    telemetry: TrainTelemetry
    lifecycle: RunLifecycle
    evaluation: EvaluateEachEpoch | None
    checkpointing: Checkpointing | None
    context: RunContext

    @property
    def trainer(self) -> TraintelEngine:
        return self.engines.trainer

    @functools.cached_property
    def config_text(self) -> str:
        """``config.yaml``'s text (``rundir.config_text``), made once for the run directory's check
        and the file."""
        return rundir.config_text(self.config)

    @property
    def keeps_files(self) -> bool:
        """Whether the run keeps files in its run directory (the diagnostic file, checkpoints), and
        so config.yaml too."""
        return self.config.sinks.diagnostic.enabled or self.checkpointing is not None

    def finish_owed_end(self) -> None:
        """Run what of a restored checkpoint's epoch end is owed (``Checkpointing.owed``): traintel's
        own duties for that epoch, in their order (the epoch record for a checkpoint an earlier
        traintel took before its epoch's end, the evaluation, the epoch's checkpoint). Ignite's
        EPOCH_COMPLETED is not fired again: the handlers of the interrupted attempt ran for it."""
        cp = self.checkpointing
        owed = cp.owed if cp is not None else None
        if cp is None or owed is None:
            return
        if owed.record:
            self.telemetry.emit_epoch(self.trainer)
        if owed.evaluation and self.evaluation is not None:
            self.evaluation(self.trainer)
        cp.epoch_ended(self.trainer)


def load_task(config: Config, task: Any, *, stdout_is_json: bool) -> Task:
    """The task given in code (checked), or the one ``task.factory`` makes, after seeding torch with
    ``run.seed``. While stdout carries JSON lines only, what the factory prints goes to stderr."""
    torch.manual_seed(config.run.seed)
    if task is not None:
        return check_task(task)
    with contextlib.redirect_stdout(sys.stderr) if stdout_is_json else contextlib.nullcontext():
        return make_task(config.task.factory, config.task.params)


def make_plan(
    config: Config,
    task: Task,
    attempt: resume.Resumption,
    run_dir: Path,
    where: Where,
    *,
    settings: Mapping[str, Any],
    extra_sinks: Sequence[Sink] = (),
    json_stream: BinaryIO | None = None,
) -> Plan:
    """Build the run's parts for ``attempt`` (restored from its checkpoint, if it has one);
    ``settings`` (``resume.fixed_settings``) go into each checkpoint."""
    coordinator, launch = where.coordinator, where.launch
    tc = config.trainer
    engines = _make_engines(config, task, where)
    trainer, model, optimizer, scheduler, data = (
        engines.trainer,
        engines.model,
        engines.optimizer,
        engines.scheduler,
        engines.data,
    )
    sinks = build_sinks(
        config.sinks,
        extra=extra_sinks,
        json_stream=json_stream,
        rank=coordinator.rank,
        stdout_ranks=config.telemetry.ranks,
        local_rank=launch.local_rank if launch is not None else 0,
    )
    if sinks.json is not None and sinks.json.console:
        _attach_progress_bar(trainer, config.telemetry.every)  # first: the bar closes before an epoch's lines
    emit = sinks.fanout.emit
    telemetry = TrainTelemetry(
        emit,
        attempt.run_id,
        every=config.telemetry.every,
        max_delay=config.telemetry.max_delay_seconds,
        emit_many=sinks.fanout.emit_many,
        coordinator=coordinator,
        attempt=attempt.attempt,
        on_nonfinite=tc.on_nonfinite,
    )

    shown = freeze(config.to_dict(redact=True))  # secrets redacted: for run.start and the sinks

    def start_record() -> RunStartRecord:
        return RunStartRecord(
            run_id=attempt.run_id,
            time=time.time(),
            rank=coordinator.rank,
            world_size=coordinator.world_size,
            attempt=attempt.attempt,
            name=config.run.name,
            run_dir=str(run_dir),
            device=str(where.device),
            config=shown,
            metrics_url=sinks.prometheus.url if sinks.prometheus is not None else None,
            backend=where.backend,
            restart_count=launch.restart_count if launch is not None else 0,
            resumed_from_step=attempt.step,
            items_total=trainer.state.progress.run_items,
        )

    lifecycle = RunLifecycle(
        emit,
        start_record,
        attempt.run_id,
        rank=coordinator.rank,
        world_size=coordinator.world_size,
        attempt=attempt.attempt,
    )

    # the handlers in the order their records come at an epoch's end: the epoch record, the
    # evaluation, the checkpoint (the stop at an epoch's end is create_trainer's)
    telemetry.attach(trainer)
    evaluation = None
    if engines.evaluator is not None and engines.val_loader is not None:
        evaluation = EvaluateEachEpoch(
            engines.evaluator, engines.val_loader, emit, attempt.run_id, coordinator, attempt=attempt.attempt
        )
        evaluation.attach(trainer)
    checkpointing = None
    cc = config.checkpoint
    if cc.enabled or attempt.state is not None:
        fanout = sinks.fanout

        def records_written() -> bool:
            """Deliver the waiting records and make them durable in the diagnostic file (waiting up
            to 5 s); False at once while it cannot write. Stdout is not waited for: a reader that
            does not read cannot hold training. Without a diagnostic file: True."""
            telemetry.flush()
            return fanout.durable(5.0)

        checkpointing = Checkpointing(
            run_dir / layout.CHECKPOINT_DIRECTORY,
            trainer=trainer,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            data=data,
            identity={"run_id": attempt.run_id, "attempt": attempt.attempt, "settings": dict(settings)},
            keep=cc.keep,
            every_steps=cc.every_steps,
            every_epochs=cc.every_epochs,
            commit_ready=records_written,
            coordinator=coordinator,
            on_signal=cc.enabled and cc.on_signal,
        )
        if evaluation is not None:
            cut = evaluation
            checkpointing.unfinished_end = lambda: cut.unfinished
        checkpointing.attach(trainer)  # after the epoch and evaluation records
        if attempt.state is not None:
            _restore(checkpointing, attempt.state, tc.max_epochs)

    context = RunContext(
        run_id=attempt.run_id,
        name=config.run.name,
        run_dir=run_dir,
        config=shown,
        rank=coordinator.rank,
        world_size=coordinator.world_size,
        attempt=attempt.attempt,
    )
    return Plan(
        config=config,
        task=task,
        where=where,
        attempt=attempt,
        run_dir=run_dir,
        engines=engines,
        sinks=sinks,
        telemetry=telemetry,
        lifecycle=lifecycle,
        evaluation=evaluation,
        checkpointing=checkpointing,
        context=context,
    )


@dataclass(frozen=True)
class Engines:
    """The model on its device, its optimizer and scheduler, the windows, the trainer and the evaluator
    (with this rank's validation data)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: WindowedLoader
    epoch_length: int | None
    trainer: TraintelEngine
    evaluator: Engine | None
    val_loader: Iterable[Any] | None


def _make_engines(config: Config, task: Task, where: Where) -> Engines:
    """The model on its device, the optimizer, scheduler, windows (this rank's share under
    torchrun), trainer and evaluator."""
    coordinator, launch, tc = where.coordinator, where.launch, config.trainer
    model = task.model.to(where.device)
    optimizer = build_optimizer(tc.optimizer, (p for p in model.parameters() if p.requires_grad))
    train_loader, val_loader = task.train_loader, task.val_loader
    windows: int | None = None
    if launch is not None:
        train_loader, val_loader = _shard(config, coordinator, train_loader, val_loader)
        windows = distributed.max_over_ranks(
            len(WindowedLoader(train_loader, tc.accumulation_steps)), where.device
        )
    data = WindowedLoader(train_loader, tc.accumulation_steps, windows=windows)
    epoch_length = len(data) if data.batches_per_epoch() is not None else None
    if epoch_length == 0:
        raise ConfigError("task.train_loader", "has no batches (its length is 0): there is nothing to train")
    total = epoch_length * tc.max_epochs if epoch_length is not None else None
    scheduler = build_scheduler(tc.scheduler, optimizer, total)
    prepare = task.prepare or default_prepare
    count_items = task.count_items or default_count_items
    trainer = create_trainer(
        model if launch is None else ddp.wrap(model, where.device),
        task.loss_fn,
        optimizer,
        scheduler,
        device=where.device,
        prepare=prepare,
        count_items=count_items,
        grad_clip_norm=tc.grad_clip_norm,
        report_grad_norm=tc.report_grad_norm,
        precision=tc.precision,
        coordinator=coordinator,
        step_class=AccumulatingStep if launch is None else ddp.DistributedStep,
        on_nonfinite=tc.on_nonfinite,
    )
    if windows and not data.batches_per_epoch():  # this rank's share is empty, the others' not
        _stand_in(trainer, task.train_loader, count_items, coordinator, config.run.seed)
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: set_epoch(train_loader, e.state.epoch))
    evaluator = None
    if val_loader is not None:
        evaluator = create_evaluator(
            model,
            task.loss_fn,
            device=where.device,
            prepare=prepare,
            count_items=count_items,
            precision=tc.precision,
        )

    return Engines(model, optimizer, scheduler, data, epoch_length, trainer, evaluator, val_loader)


def _restore(handler: Checkpointing, state: dict[str, Any], max_epochs: int) -> None:
    """Continue from a checkpoint; one that does not fit this run is a ConfigError."""
    try:
        handler.restore(state, max_epochs)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            "run.resume", f"the checkpoint at step {state['step']} does not fit this run: {one_line(exc)}"
        ) from None


def _shard(
    config: Config, coordinator: Coordinator, train: Iterable[Any], val: Iterable[Any] | None
) -> tuple[Iterable[Any], Iterable[Any] | None]:
    """This rank's share of the training and validation data (``traintel.engine.shards.shard``)."""

    def share(loader: Iterable[Any], key: str) -> Iterable[Any]:
        try:
            return shard(loader, coordinator.rank, coordinator.world_size, config.run.seed)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None

    train = share(train, "task.train_loader")
    if not isinstance(train, Sized):
        raise ConfigError(
            "task.train_loader", "needs a length in a run of several ranks (they step together)"
        )
    return train, None if val is None else share(val, "task.val_loader")


def _stand_in(
    trainer: TraintelEngine,
    loader: Iterable[Any],
    count_items: Callable[[Any], int],
    coordinator: Coordinator,
    seed: int,
) -> None:
    """Give a rank whose share of the training data is empty a batch to join each step's gradient
    reduction with (``ddp.DistributedStep.take_part``: a pass of zero weight): the first batch
    with items of rank 0's share, read with every generator put back afterwards, so that what
    this rank draws later is as if it had read nothing. A loader the task shards itself gives
    none here: the step then fails, naming the empty rank."""
    first = shard(loader, 0, coordinator.world_size, seed)
    saved, own = rng.capture(), [g.get_state() for g in rng.loader_generators(first)]
    try:
        batch = next((b for b in first if count_items(b)), None)
    finally:
        rng.set_loader_generators(first, own)
        rng.restore(saved)
    step = trainer.update_step
    if batch is not None and isinstance(step, ddp.DistributedStep):
        step.example = batch


def _attach_progress_bar(trainer: TraintelEngine, every: int) -> None:
    """A tqdm bar (Ignite's ProgressBar, on stderr) with the step loss, refreshed at the telemetry
    cadence, so the terminal view syncs with the device no more often than emission does."""
    from ignite.handlers import ProgressBar

    ProgressBar(persist=True).attach(
        trainer,
        output_transform=lambda loss: {"loss": float(loss)},
        event_name=Events.ITERATION_COMPLETED(every=every),
    )
