"""An Ignite evaluator that accumulates the item-weighted validation loss on the device."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.engine.events import State

from traintel.engine.metrics import EvalMetrics
from traintel.engine.step import (
    AUTOCAST,
    CountItems,
    ForwardLoss,
    LossFn,
    Prepare,
    default_count_items,
    loss_calls,
    output_calls,
)


class EvalAccumulator:
    """Sum of per-item losses and item count over one evaluation pass, and the task's metrics."""

    def __init__(self, device: torch.device, metrics: EvalMetrics | None = None) -> None:
        self.device = device
        self.metrics = metrics
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.items = 0
        self.batches = 0

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.items = 0
        self.batches = 0
        if self.metrics is not None:
            self.metrics.reset()


class EvalState(State):
    """The evaluator's Ignite ``State``, with the pass's accumulator declared."""

    def __init__(self, acc: EvalAccumulator, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eval = acc
        """The loss sum and item count of the current (or last) pass."""


def eval_state(engine: Engine) -> EvalState:
    """The evaluator's ``EvalState``; a TypeError for an engine not made by ``create_evaluator``."""
    state = engine.state
    if not isinstance(state, EvalState):
        msg = f"expected an evaluator made by create_evaluator, got a {type(state).__name__}"
        raise TypeError(msg)
    return state


def create_evaluator(
    model: torch.nn.Module,
    loss_fn: LossFn | None,
    *,
    device: torch.device,
    forward_loss: ForwardLoss | None = None,
    prepare: Prepare | None = None,
    count_items: CountItems = default_count_items,
    precision: str = "fp32",
    metrics: EvalMetrics | None = None,
) -> Engine:
    """An Engine whose ``state.eval`` holds the pass's loss sum and item count. Each batch's mean loss
    is computed as the trainer's (``step.loss_calls``: ``loss_fn`` or ``forward_loss``); ``metrics``
    are fed each batch with items (``step.output_calls``) and reset with the pass."""
    acc = EvalAccumulator(device, metrics)
    prepare_batch, loss = loss_calls(model, loss_fn=loss_fn, forward_loss=forward_loss, prepare=prepare)
    with_output = output_calls(model, loss_fn=loss_fn, forward_loss=forward_loss) if metrics else None

    dtype = AUTOCAST.get(precision)

    def autocast() -> AbstractContextManager[Any]:
        if dtype is not None:
            return torch.autocast(device_type=device.type, dtype=dtype)
        return nullcontext()

    def evaluate(engine: Engine, batch: Any) -> torch.Tensor:
        model.eval()
        n = int(count_items(batch))
        acc.batches += 1
        if n == 0:
            return acc.loss_sum.new_full((), float("nan"))
        prepared = prepare_batch(batch, device)
        with torch.no_grad(), autocast():
            if with_output is None or metrics is None:
                raw = loss(prepared).detach()
            else:
                raw, output, target = with_output(prepared)
                raw = raw.detach()
                metrics.update(output, target)
        acc.loss_sum = acc.loss_sum + raw.double() * n
        acc.items += n
        return raw

    evaluator = Engine(evaluate)
    evaluator.state = EvalState(acc)
    evaluator.add_event_handler(Events.STARTED, lambda _: acc.reset())
    return evaluator
