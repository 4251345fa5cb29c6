"""Create the Ignite trainer: one iteration per optimizer step over a window of micro-batches."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers.early_stopping import EarlyStopping

from traintel.engine.coordination import Coordinator
from traintel.engine.events import TraintelEvents
from traintel.engine.progress import Progress
from traintel.engine.state import TraintelState
from traintel.engine.step import (
    AccumulatingStep,
    CountItems,
    ForwardLoss,
    LossFn,
    Prepare,
    TrainMetric,
    default_count_items,
    epochs_last_step,
)

_TRAINTEL_EVENT_NAMES = frozenset(event.name for event in TraintelEvents)


class TraintelEngine(Engine):
    """An Ignite ``Engine`` whose state is a ``TraintelState`` (the run's ``Progress``, the step's
    output); events are fired by Ignite itself."""

    state: TraintelState
    update_step: AccumulatingStep | None = None
    """The update step ``create_trainer`` made the process function (its model, optimizer, coordinator),
    without reading Ignite's private ``_process_function``; None for an engine made otherwise."""

    def __init__(
        self, process_function: Callable[[Engine, Any], Any], progress: Progress | None = None
    ) -> None:
        super().__init__(process_function)
        self.state = TraintelState(progress)  # output may be a step loss summed when first read
        self.listened: set[str] = set()
        """The names of the ``TraintelEvents`` a handler was ever attached to: the update step fires
        only those (``AccumulatingStep.fires``)."""
        self.handler_stop: str | None = None
        """Why a handler ended the run with ``terminate()``, when one did while no stop was under way
        (``state.stop_reason`` None): ``stopped by EarlyStopping (patience N)`` for Ignite's
        EarlyStopping, else ``stopped by a handler``."""

    def terminate(self, skip_completed: bool = False) -> None:
        """Ignite's ``terminate``, noting in ``handler_stop`` who called it when it is a handler's: the
        caller is read from the calling frame, as Ignite's EarlyStopping leaves no other trace."""
        if self.handler_stop is None and getattr(self.state, "stop_reason", None) is None:
            frame = inspect.currentframe()
            try:
                caller = frame.f_back.f_locals.get("self") if frame is not None and frame.f_back else None
            finally:
                del frame  # no reference cycle through this frame
            if isinstance(caller, EarlyStopping) and caller.trainer is self:
                self.handler_stop = f"stopped by EarlyStopping (patience {caller.patience})"
            else:
                self.handler_stop = "stopped by a handler"
        super().terminate(skip_completed)

    def add_event_handler(
        self, event_name: Any, handler: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """Ignite's ``add_event_handler``, noting a handler on one of ``TraintelEvents`` (filtered or
        not) in ``listened``; an ``EventsList`` comes back here once per event."""
        handle = super().add_event_handler(event_name, handler, *args, **kwargs)
        name = getattr(event_name, "name", None)
        if name in _TRAINTEL_EVENT_NAMES:
            self.listened.add(name)
        return handle


def create_trainer(
    model: torch.nn.Module,
    loss_fn: LossFn | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    *,
    device: torch.device | str = "cpu",
    forward_loss: ForwardLoss | None = None,
    prepare: Prepare | None = None,
    count_items: CountItems | None = None,
    grad_clip_norm: float | None = None,
    report_grad_norm: bool = False,
    precision: str = "fp32",
    grad_scaler: torch.amp.GradScaler | None = None,
    coordinator: Coordinator | None = None,
    step_class: type[AccumulatingStep] = AccumulatingStep,
    on_nonfinite: str = "warn",
    train_metrics: Mapping[str, TrainMetric] | None = None,
    metrics_every: int = 1,
) -> TraintelEngine:
    """A real ``ignite.engine.Engine`` (a ``TraintelEngine``) whose data are ``WindowedLoader`` windows.

    Any Ignite handler attaches to it as usual. ``state.output`` is the step's loss
    tensor (float64, detached, on the device; summed when first read); ``state.step_output``
    holds the full ``StepOutput`` and ``state.progress`` the run's ``Progress``;
    ``TraintelEvents`` are registered; ``update_step`` is the step. ``coordinator`` and
    ``step_class`` make it one rank of a torch.distributed run (see ``traintel.engine.ddp``).
    ``on_nonfinite="skip_step"`` does not take the optimizer step of a window whose loss is not
    finite (``trainer.on_nonfinite``); ``grad_scaler`` scales backward under ``precision="fp16"``.
    Give ``loss_fn=None`` and ``forward_loss`` for a model that computes its own loss; ``prepare``
    defaults to what that loss takes (``step.loss_calls``). ``train_metrics`` (``{name: fn(step_output)}``)
    put the training metrics of every ``metrics_every``-th step (those whose records are emitted,
    ``telemetry.every``) in ``state.step_output.metrics``.
    """
    step = step_class(
        model,
        loss_fn,
        optimizer,
        scheduler,
        device=torch.device(device),
        forward_loss=forward_loss,
        prepare=prepare,
        count_items=count_items or default_count_items,
        grad_clip_norm=grad_clip_norm,
        report_grad_norm=report_grad_norm,
        precision=precision,
        grad_scaler=grad_scaler,
        coordinator=coordinator,
        on_nonfinite=on_nonfinite,
        train_metrics=train_metrics,
        metrics_every=metrics_every,
    )
    engine = TraintelEngine(step, step.progress)
    engine.update_step = step
    engine.add_event_handler(Events.EPOCH_COMPLETED, _end_if_stopping, step.coordinator)
    engine.register_events(*TraintelEvents)
    engine.add_event_handler(Events.EPOCH_STARTED, _start_epoch)
    return engine


def _start_epoch(engine: TraintelEngine) -> None:
    """The epoch's counts start at zero, visible in ``state.progress`` from EPOCH_STARTED on (an epoch
    restored part-way keeps its counts)."""
    engine.state.progress.start_epoch(engine.state.epoch)


def _end_if_stopping(engine: TraintelEngine, coordinator: Coordinator) -> None:
    """EPOCH_COMPLETED: a stop (``Coordinator.stopping``) ends the run here, after the epoch's end (its
    record, evaluation and checkpoint), never between the epoch's last step and its end."""
    if coordinator.stopping:
        engine.terminate()


def limit_steps(engine: TraintelEngine, max_steps: int) -> None:
    """End the run after its optimizer step ``max_steps`` (``trainer.max_steps``), noted in
    ``state.step_limit``. When that step is its epoch's last, the run ends after the epoch's end
    (its record, evaluation and checkpoint); otherwise right after the step, with ``state.epoch_cut``
    set: the epoch is left part-way, as a stop leaves it, so that a longer run can continue it from
    a checkpoint of that step (``Run`` then gives the part-epoch its record)."""

    def step_ended(engine: TraintelEngine) -> None:
        st = engine.state
        if st.step_limit is not None or st.progress.run_steps < max_steps:
            return
        st.step_limit = max_steps
        if not epochs_last_step(engine):
            st.epoch_cut = True
            Engine.terminate(engine)  # Ignite's own: not a handler's stop (``handler_stop``)

    def epoch_ended(engine: TraintelEngine) -> None:
        if engine.state.step_limit is not None:
            Engine.terminate(engine)

    engine.add_event_handler(Events.ITERATION_COMPLETED, step_ended)
    engine.add_event_handler(Events.EPOCH_COMPLETED, epoch_ended)
