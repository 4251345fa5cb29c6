"""An Ignite evaluator that accumulates the item-weighted validation loss on the device."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.engine.events import State

from traintel.engine.step import CountItems, LossFn, Prepare, default_count_items, default_prepare


class EvalAccumulator:
    """Sum of per-item losses and item count over one evaluation pass."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.items = 0
        self.batches = 0

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.items = 0
        self.batches = 0


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
    loss_fn: LossFn,
    *,
    device: torch.device,
    prepare: Prepare = default_prepare,
    count_items: CountItems = default_count_items,
    precision: str = "fp32",
) -> Engine:
    """An Engine whose ``state.eval`` holds the pass's loss sum and item count."""
    acc = EvalAccumulator(device)

    def autocast() -> AbstractContextManager[Any]:
        if precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return nullcontext()

    def evaluate(engine: Engine, batch: Any) -> torch.Tensor:
        model.eval()
        n = int(count_items(batch))
        acc.batches += 1
        if n == 0:
            return acc.loss_sum.new_full((), float("nan"))
        inputs, targets = prepare(batch, device)
        with torch.no_grad(), autocast():
            raw = loss_fn(model(inputs), targets).detach()
        acc.loss_sum = acc.loss_sum + raw.double() * n
        acc.items += n
        return raw

    evaluator = Engine(evaluate)
    evaluator.state = EvalState(acc)
    evaluator.add_event_handler(Events.STARTED, lambda _: acc.reset())
    return evaluator
