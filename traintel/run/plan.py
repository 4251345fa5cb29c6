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
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from ignite.engine import Engine, Events

from traintel.config import Config, TrainerConfig
from traintel.engine import ddp, fsdp, rng
from traintel.engine.coordination import Coordinator
from traintel.engine.evaluator import create_evaluator
from traintel.engine.metrics import EvalMetrics
from traintel.engine.shards import set_epoch, shard
from traintel.engine.step import AccumulatingStep, default_count_items
from traintel.engine.trainer import TraintelEngine, create_trainer, limit_steps
from traintel.engine.windows import WindowedLoader
from traintel.errors import ConfigError, one_line
from traintel.handlers.evaluation import Evaluation
from traintel.handlers.lifecycle import RunLifecycle
from traintel.handlers.telemetry import TrainTelemetry
from traintel.records import RunStartRecord, freeze
from traintel.run import distributed, layout, resume, rundir, sharded
from traintel.run.assembly import SinkSet, build_sinks
from traintel.run.checkpointing import BestOf, Checkpointing
from traintel.run.optim import (
    build_optimizer,
    build_scheduler,
    class_name,
    length_change,
    run_length,
    task_optimizer,
    task_scheduler,
)
from traintel.sinks.base import RunContext, Sink
from traintel.task import Task, check_task, make_task

_log = logging.getLogger("traintel")

THREADED_CATCH_UP_SECONDS = 2.0
"""How long a checkpoint waits at most for the threaded plug-ins to take the records it covers
(records of steps before a resumed attempt's checkpoint are not sent again)."""


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
    evaluation: Evaluation | None
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
        if cp is not None and cp.owed_evaluation and self.evaluation is not None:
            evaluation, trainer = self.evaluation, self.trainer
            cp.run_owed_evaluation(lambda: evaluation(trainer))  # after a step, part-way through its epoch
        owed = cp.owed if cp is not None else None
        if cp is None or owed is None:
            return
        if owed.record:
            self.telemetry.emit_epoch(self.trainer)
        if owed.evaluation and self.evaluation is not None and self.evaluation.due_at_epoch_end(self.trainer):
            self.evaluation(self.trainer)
        cp.epoch_ended(self.trainer)


def load_task(config: Config, task: Any, *, stdout_is_json: bool) -> Task:
    """The task given in code (checked), or the one ``task.factory`` makes, after seeding torch with
    ``run.seed`` (a model factory, ``Task.model``, is called after it too). While stdout carries JSON
    lines only, what the factory and the model factory print goes to stderr."""
    factory = config.task.factory
    if task is None and factory is None:
        raise ConfigError(
            "task.factory",
            "is null, which says the task is given in code: pass it to traintel.build(config, task), "
            "or set a 'module:function' factory",
        )
    torch.manual_seed(config.run.seed)
    with contextlib.redirect_stdout(sys.stderr) if stdout_is_json else contextlib.nullcontext():
        if task is None and factory is not None:
            return make_task(factory, config.task.params)
        return check_task(task)


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
    _check_best(config, task)
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
            strategy=None if launch is None else tc.distributed.strategy,
            restart_count=launch.restart_count if launch is not None else 0,
            resumed_from_step=attempt.step,
            items_total=trainer.state.progress.run_items,
            optimizer=class_name(optimizer),
            scheduler=None if scheduler is None else class_name(scheduler),
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
    if engines.evaluator is not None and engines.val_loaders:
        evaluation = Evaluation(
            engines.evaluator,
            engines.val_loaders,
            emit,
            attempt.run_id,
            coordinator,
            attempt=attempt.attempt,
            every_epochs=config.eval.every_epochs,
            every_steps=config.eval.every_steps,
            scope=_evaluation_scope(trainer, tc),
        )
        evaluation.attach(trainer)
    checkpointing = None
    cc = config.checkpoint
    classes = {
        "optimizer": class_name(optimizer),
        "scheduler": None if scheduler is None else class_name(scheduler),
    }
    if attempt.state is not None:
        _same_classes(attempt.state, classes, run_dir)
        _schedule_length(config, attempt.state, engines.schedule_steps, optimizer)
    if cc.enabled or cc.best is not None or attempt.state is not None:
        fanout = sinks.fanout

        def records_written() -> bool:
            """Deliver the waiting records and make them durable in the diagnostic file (waiting up
            to 5 s); False at once while it cannot write. Stdout is not waited for: a reader that
            does not read cannot hold training. Without a diagnostic file: True. A threaded plug-in
            gets up to ``THREADED_CATCH_UP_SECONDS`` to take them too, and is not waited for beyond."""
            telemetry.flush()
            durable = fanout.durable(5.0)
            fanout.catch_up(THREADED_CATCH_UP_SECONDS)
            return durable

        checkpointing = Checkpointing(
            run_dir / layout.CHECKPOINT_DIRECTORY,
            trainer=trainer,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            grad_scaler=engines.grad_scaler,
            data=data,
            identity={
                "run_id": attempt.run_id,
                "attempt": attempt.attempt,
                "settings": dict(settings),
                "classes": classes,
                "schedule_steps": engines.schedule_steps,
            },
            keep=cc.keep,
            every_steps=cc.every_steps,
            every_epochs=cc.every_epochs,
            commit_ready=records_written,
            coordinator=coordinator,
            on_signal=cc.enabled and cc.on_signal,
            best=None if cc.best is None else BestOf(cc.best.metric, cc.best.split, cc.best.chosen_mode),
            shards=None if launch is None else sharded.ShardedState(model, optimizer, coordinator.rank),
            background=cc.async_,
            emit=emit,
        )
        if evaluation is not None:
            cut = evaluation
            checkpointing.unfinished_end = lambda: cut.unfinished
        checkpointing.attach(trainer)  # after the epoch and evaluation records
        if attempt.state is not None:
            _restore(checkpointing, attempt.state, tc.max_epochs)
        if attempt.attempt > 0:
            checkpointing.read_best()

    context = RunContext(
        run_id=attempt.run_id,
        name=config.run.name,
        run_dir=run_dir,
        config=shown,
        rank=coordinator.rank,
        world_size=coordinator.world_size,
        attempt=attempt.attempt,
        resumed_from_step=attempt.step,
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
    schedule_steps: int | None
    """The run's optimizer steps when the scheduler's length defaults to them (``optim.run_length``)."""
    grad_scaler: torch.amp.GradScaler | None
    """``precision: fp16``'s loss scale (its state is checkpointed), else None."""
    trainer: TraintelEngine
    evaluator: Engine | None
    val_loaders: dict[str, Iterable[Any]]
    """This rank's validation data by split name (none: no evaluation)."""


def _make_engines(config: Config, task: Task, where: Where) -> Engines:
    """The model on its device, the optimizer, scheduler, windows (this rank's share under
    torchrun), trainer and evaluator."""
    coordinator, launch, tc = where.coordinator, where.launch, config.trainer
    model = task.model.to(where.device)
    sharding = launch is not None and tc.distributed.strategy == "fsdp"
    if sharding:
        model = _fully_shard(model, tc)  # before the optimizer: it takes the sharded parameters
    optimizer = _optimizer(config, task, model)
    train_loader, val_loaders = task.train_loader, dict(task.val_loaders or {})
    windows: int | None = None
    most_batches: int | None = None
    if launch is not None:
        train_loader, val_loaders = _shard(config, coordinator, train_loader, val_loaders)
        most_batches = distributed.max_over_ranks(len(train_loader), where.device)  # type: ignore[arg-type]
        windows = math.ceil(most_batches / tc.accumulation_steps)
    data = WindowedLoader(train_loader, tc.accumulation_steps, windows=windows)
    epoch_length = len(data) if data.batches_per_epoch() is not None else None
    if epoch_length == 0:
        raise ConfigError("task.train_loader", "has no batches (its length is 0): there is nothing to train")
    total = _run_steps(tc, epoch_length)
    scheduler = _scheduler(config, task, optimizer, total)
    count_items = task.count_items or default_count_items
    stepped = _compiled(model, tc) if tc.compile else model
    grad_scaler = _grad_scaler(tc, where.device) if tc.precision == "fp16" else None
    trainer = create_trainer(
        stepped if launch is None or sharding else ddp.wrap(stepped, where.device),
        task.loss_fn,
        optimizer,
        scheduler,
        device=where.device,
        forward_loss=task.forward_loss,
        prepare=task.prepare,
        count_items=count_items,
        grad_clip_norm=tc.grad_clip_norm,
        report_grad_norm=tc.report_grad_norm,
        precision=tc.precision,
        grad_scaler=grad_scaler,
        coordinator=coordinator,
        step_class=_step_class(launch, sharding),
        on_nonfinite=tc.on_nonfinite,
        train_metrics=task.train_metrics,
        metrics_every=config.telemetry.every,
    )
    if isinstance(trainer.update_step, fsdp.FullyShardedStep):
        trainer.update_step.k, trainer.update_step.most_batches = tc.accumulation_steps, most_batches
    if tc.max_steps is not None:
        limit_steps(trainer, tc.max_steps)
    if windows and not data.batches_per_epoch():  # this rank's share is empty, the others' not
        _stand_in(trainer, task.train_loader, count_items, coordinator, config.run.seed)
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: set_epoch(train_loader, e.state.epoch))
    evaluator = None
    if val_loaders:
        evaluator = create_evaluator(
            stepped,
            task.loss_fn,
            device=where.device,
            forward_loss=task.forward_loss,
            prepare=task.prepare,
            count_items=count_items,
            precision=tc.precision,
            metrics=EvalMetrics(task.metrics, where.device) if task.metrics else None,
        )

    schedule_steps = None if task.scheduler is not None else run_length(tc.scheduler, total)
    return Engines(
        model,
        optimizer,
        scheduler,
        data,
        epoch_length,
        schedule_steps,
        grad_scaler,
        trainer,
        evaluator,
        val_loaders,
    )


def _evaluation_scope(
    trainer: TraintelEngine, tc: TrainerConfig
) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """What each evaluation runs inside: under FSDP, the whole model gathered (``fsdp.evaluating``)."""
    step = trainer.update_step
    if not isinstance(step, fsdp.FullyShardedStep):
        return contextlib.nullcontext
    root, reshard = step.model, tc.distributed.fsdp.reshard_after_forward
    return lambda: fsdp.evaluating(root, reshard)


def _step_class(launch: distributed.Launch | None, sharding: bool) -> type[AccumulatingStep]:
    """The update step: one process's, a DDP rank's or an FSDP rank's."""
    if launch is None:
        return AccumulatingStep
    return fsdp.FullyShardedStep if sharding else ddp.DistributedStep


def _fully_shard(model: torch.nn.Module, tc: TrainerConfig) -> torch.nn.Module:
    """``model`` sharded as ``trainer.distributed.fsdp`` says (``traintel.engine.fsdp.shard``); the
    settings FSDP cannot take are refused first."""
    if tc.precision == "fp16":
        raise ConfigError(
            "trainer.precision",
            "fp16 is not available with trainer.distributed.strategy fsdp (its loss scale would need the "
            "ranks' overflow checks agreed); use bf16, or fsdp.mixed_precision",
        )
    if tc.compile:
        raise ConfigError(
            "trainer.compile", "is not available with trainer.distributed.strategy fsdp; set it to false"
        )
    cfg = tc.distributed.fsdp
    mp = cfg.mixed_precision
    try:
        return fsdp.shard(
            model,
            cfg.shard_modules,
            reshard_after_forward=cfg.reshard_after_forward,
            mixed_precision=None if mp is None else (mp.param_dtype, mp.reduce_dtype),
        )
    except LookupError as exc:
        index = int(exc.args[0])
        classes = sorted({type(m).__name__ for m in model.modules()})
        raise ConfigError(
            f"trainer.distributed.fsdp.shard_modules[{index}]",
            f"{cfg.shard_modules[index]!r} names no module of the model (its classes: {', '.join(classes)})",
        ) from None


def _run_steps(tc: TrainerConfig, epoch_length: int | None) -> int | None:
    """The run's optimizer steps, which a schedule's length defaults to: ``max_epochs`` epochs, or
    ``max_steps`` when that comes first (None when neither is known: the loader has no length and
    there is no step limit). A step limit the epochs end before is reported in one warning line."""
    epochs = epoch_length * tc.max_epochs if epoch_length is not None else None
    if tc.max_steps is None:
        return epochs
    if epochs is not None and epochs < tc.max_steps:
        _log.warning(
            "trainer.max_steps: %d steps are more than trainer.max_epochs holds (%d epochs of %d): the run "
            "ends at step %d unless trainer.max_epochs is raised",
            tc.max_steps, tc.max_epochs, epoch_length, epochs,
        )  # fmt: skip
        return epochs
    return tc.max_steps


def _grad_scaler(tc: TrainerConfig, device: torch.device) -> torch.amp.GradScaler:
    """``torch.amp.GradScaler`` on the run's device with ``trainer.grad_scaler``'s settings."""
    make = getattr(getattr(torch, "amp", None), "GradScaler", None)
    if make is None:
        raise ConfigError(
            "trainer.precision",
            f"fp16 needs torch.amp.GradScaler (torch >= 2.3), not torch {torch.__version__}",
        )
    gs = tc.grad_scaler
    return make(
        device.type,
        init_scale=gs.init_scale,
        growth_factor=gs.growth_factor,
        backoff_factor=gs.backoff_factor,
        growth_interval=gs.growth_interval,
    )


def _compiled(model: torch.nn.Module, tc: TrainerConfig) -> torch.nn.Module:
    """``torch.compile(model)`` with ``trainer.compile_backend`` and ``compile_mode``: the module the
    steps and the evaluator call. It shares the model's parameters; the plan keeps the model itself
    for the optimizer and the checkpoints (its keys have no ``_orig_mod.`` prefix). Compiling is lazy:
    a backend that fails does so at the first step."""
    try:
        compiled = torch.compile(model, backend=tc.compile_backend, mode=tc.compile_mode)
    except Exception as exc:  # an unknown backend is refused here, before anything is trained
        raise ConfigError("trainer.compile_backend", one_line(exc)) from None
    assert isinstance(compiled, torch.nn.Module)
    return compiled


def _optimizer(config: Config, task: Task, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The task's optimizer, else the one ``trainer.optimizer`` names (over the model on its device)."""
    if task.optimizer is None:
        return build_optimizer(config.trainer.optimizer, model)
    if config.trainer.optimizer.no_decay is not None:
        raise ConfigError(
            "trainer.optimizer.no_decay",
            "the task gives its own optimizer: make its parameter groups there, or leave the task's out",
        )
    return task_optimizer(task, model)


def _scheduler(config: Config, task: Task, optimizer: torch.optim.Optimizer, total: int | None) -> Any:
    """The task's scheduler, else the one ``trainer.scheduler`` names (None: a constant rate)."""
    if task.scheduler is None:
        return build_scheduler(config.trainer.scheduler, optimizer, total)
    if config.trainer.scheduler is not None:
        raise ConfigError(
            "trainer.scheduler",
            "the task gives its own scheduler: set trainer.scheduler to null, or leave the task's out",
        )
    return task_scheduler(task, optimizer)


def _check_best(config: Config, task: Task) -> None:
    """``checkpoint.best`` names a split the task evaluates and a value its evaluations have."""
    best = config.checkpoint.best
    if best is None:
        return
    splits, metrics = list(task.val_loaders or {}), sorted(task.metrics or {})
    if not splits:
        raise ConfigError(
            "checkpoint.best.split",
            f"the task has no validation data (val_loader or val_loaders) to evaluate {best.split!r} on",
        )
    if config.eval.every_epochs is None and config.eval.every_steps is None:
        raise ConfigError(
            "checkpoint.best", "needs evaluations: set eval.every_epochs or eval.every_steps (both are null)"
        )
    if best.split not in splits:
        shown = ", ".join(repr(name) for name in splits)
        raise ConfigError(
            "checkpoint.best.split", f"must be a split the task evaluates ({shown}), got {best.split!r}"
        )
    name = best.metric.removeprefix("eval.")
    if name != "loss" and name not in metrics:
        allowed = ", ".join(repr(f"eval.{m}") for m in metrics)
        problem = f"or one of the task's metrics ({allowed})" if metrics else "(the task has no metrics)"
        raise ConfigError("checkpoint.best.metric", f"must be 'eval.loss' {problem}, got {best.metric!r}")


def _same_classes(state: Mapping[str, Any], classes: Mapping[str, str | None], run_dir: Path) -> None:
    """The optimizer and scheduler are of the classes the checkpoint was taken with (their state
    would not fit others); a checkpoint that did not record them is taken to fit."""
    saved = state.get("classes")
    if not isinstance(saved, Mapping):
        return
    for part in ("optimizer", "scheduler"):
        if saved.get(part) != classes[part]:
            raise ConfigError(
                f"trainer.{part}",
                f"cannot change when resuming the run in {str(run_dir)!r}: its checkpoint has "
                f"{saved.get(part)!r}, this attempt {classes[part]!r}",
            )


def _schedule_length(
    config: Config, state: Mapping[str, Any], steps: int | None, optimizer: torch.optim.Optimizer
) -> None:
    """Warn, in one line, what the learning rate will do when this attempt changes the length of a
    schedule tied to the run's steps (a one-cycle schedule cannot go past its end: a ConfigError)."""
    saved = state.get("schedule_steps")
    if type(saved) is int and steps is not None and saved != steps:
        _log.warning(length_change(config.trainer.scheduler, saved, steps, int(state["step"]), optimizer))


def _restore(handler: Checkpointing, state: dict[str, Any], max_epochs: int) -> None:
    """Continue from a checkpoint; one that does not fit this run is a ConfigError."""
    try:
        handler.restore(state, max_epochs)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            "run.resume", f"the checkpoint at step {state['step']} does not fit this run: {one_line(exc)}"
        ) from None


def _shard(
    config: Config, coordinator: Coordinator, train: Iterable[Any], val: Mapping[str, Iterable[Any]]
) -> tuple[Iterable[Any], dict[str, Iterable[Any]]]:
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
    keys = {
        name: "task.val_loader" if list(val) == ["val"] else f"task.val_loaders[{name!r}]" for name in val
    }
    return train, {name: share(loader, keys[name]) for name, loader in val.items()}


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
