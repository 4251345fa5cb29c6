"""Create the Ignite trainer: one iteration per optimizer step over a window of micro-batches."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from ignite.engine import Engine, Events

from traintel.engine.coordination import Coordinator
from traintel.engine.events import TraintelEvents
from traintel.engine.progress import Progress
from traintel.engine.state import TraintelState
from traintel.engine.step import (
    AccumulatingStep,
    CountItems,
    LossFn,
    Prepare,
    default_count_items,
    default_prepare,
)


class TraintelEngine(Engine):
    """An Ignite ``Engine`` that fires events without a debug message per event.

    Ignite formats a debug log message for every event it fires, handled or not (an
    iteration fires four), and asks its logger each time. This engine asks once per epoch
    (at STARTED and EPOCH_STARTED): while the logger is not at DEBUG it runs the handlers
    itself, with Ignite's calling convention (the engine first when the handler was
    registered with it, then the event's arguments, then the handler's own); at DEBUG it
    fires exactly as Ignite does.
    """

    _debug = True
    """Whether the logger was at DEBUG when the run or the current epoch started."""

    state: TraintelState

    def __init__(
        self, process_function: Callable[[Engine, Any], Any], progress: Progress | None = None
    ) -> None:
        super().__init__(process_function)
        self.state = TraintelState(progress)  # output may be a step loss summed when first read

    def _fire_event(self, event_name: Any, *event_args: Any, **event_kwargs: Any) -> None:
        if event_name is Events.EPOCH_STARTED or event_name is Events.STARTED:
            self._debug = self.logger.isEnabledFor(logging.DEBUG)
        if self._debug:
            super()._fire_event(event_name, *event_args, **event_kwargs)
            return
        self.last_event_name = event_name
        handlers = self._event_handlers.get(event_name)
        if not handlers:
            return
        for func, args, kwargs in handlers:
            if event_kwargs:
                kwargs.update(event_kwargs)
            if args and isinstance(args[0], weakref.ref):
                engine = args[0]()
                if engine is None:
                    msg = "Engine reference not resolved. Cannot execute event handler."
                    raise RuntimeError(msg)
                if len(args) == 1 and not event_args and not kwargs:
                    func(engine)  # the common case, without argument unpacking
                else:
                    func(engine, *event_args, *args[1:], **kwargs)
            else:
                func(*event_args, *args, **kwargs)


def create_trainer(
    model: torch.nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    *,
    device: torch.device | str = "cpu",
    prepare: Prepare | None = None,
    count_items: CountItems | None = None,
    grad_clip_norm: float | None = None,
    report_grad_norm: bool = False,
    precision: str = "fp32",
    coordinator: Coordinator | None = None,
    step_class: type[AccumulatingStep] = AccumulatingStep,
    on_nonfinite: str = "warn",
) -> TraintelEngine:
    """A real ``ignite.engine.Engine`` (a ``TraintelEngine``) whose data are ``WindowedLoader`` windows.

    Any Ignite handler attaches to it as usual. ``state.output`` is the step's loss
    tensor (float64, detached, on the device; summed when first read); ``state.step_output``
    holds the full ``StepOutput`` and ``state.progress`` the run's ``Progress``;
    ``TraintelEvents`` are registered. ``coordinator`` and ``step_class`` make it one rank of a
    torch.distributed run (see ``traintel.engine.ddp``). ``on_nonfinite="skip_step"`` does not take
    the optimizer step of a window whose loss is not finite (``trainer.on_nonfinite``).
    """
    step = step_class(
        model,
        loss_fn,
        optimizer,
        scheduler,
        device=torch.device(device),
        prepare=prepare or default_prepare,
        count_items=count_items or default_count_items,
        grad_clip_norm=grad_clip_norm,
        report_grad_norm=report_grad_norm,
        precision=precision,
        coordinator=coordinator,
        on_nonfinite=on_nonfinite,
    )
    engine = TraintelEngine(step, step.progress)
    engine.register_events(*TraintelEvents)
    engine.add_event_handler(Events.EPOCH_STARTED, _start_epoch)
    return engine


def _start_epoch(engine: TraintelEngine) -> None:
    """The epoch's counts start at zero, visible in ``state.progress`` from EPOCH_STARTED on (an epoch
    restored part-way keeps its counts)."""
    engine.state.progress.start_epoch(engine.state.epoch)
