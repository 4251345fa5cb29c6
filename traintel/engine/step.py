"""The update step: one optimizer step over one accumulation window, scaled by items."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from ignite.engine import Engine

from traintel.engine.events import TraintelEvents
from traintel.engine.windows import Window

Prepare = Callable[[Any, torch.device], tuple[Any, Any]]
CountItems = Callable[[Any], int]
LossFn = Callable[[Any, Any], torch.Tensor]


class MicroBatchOutput(NamedTuple):
    """One micro-batch: the tensors given to backward, detached, still on the device.

    (A NamedTuple: immutable and cheap to build once per micro-batch.)
    """

    position: int
    """1-based position in the window."""
    batch: int
    """1-based index in the epoch."""
    items: int
    """n_b."""
    scale: float
    """n_b / N_t (0.0 for a micro-batch with no items)."""
    raw_loss: torch.Tensor
    """mean_loss_b (NaN when the micro-batch has no items and was not run)."""
    loss: torch.Tensor
    """s_b = raw_loss * scale: exactly what went to backward."""


@dataclass(slots=True)
class Totals:
    """Running totals of one epoch (reset when the next epoch starts) and of the run.

    ``loss_sum`` stays a float64 tensor on the device (no host sync per step); it is the
    sum over the epoch's windows of ``step loss * N_t``, i.e. the sum of per-item losses.
    """

    epoch: int
    loss_sum: torch.Tensor
    items: int = 0
    batches: int = 0
    steps: int = 0
    run_items: int = 0
    run_steps: int = 0


class StepOutput(NamedTuple):
    """One optimizer step. Tensors stay on the device; handlers convert them when they emit."""

    epoch: int
    step: int
    """Optimizer steps completed, including this one (unchanged when skipped)."""
    window: Window
    items: int
    """N_t."""
    micro: tuple[MicroBatchOutput, ...]
    loss: torch.Tensor
    """Sum of the window's s_b, float64: the objective of this step."""
    items_total: int
    """Items processed since the run started, including this window."""
    lr: float
    """Learning rate of the first parameter group used by this step."""
    grad_norm: torch.Tensor | None
    skipped: bool


def default_prepare(batch: Any, device: torch.device) -> tuple[Any, Any]:
    """``(inputs, targets)`` moved to ``device``."""
    inputs, targets = batch
    return _to(inputs, device), _to(targets, device)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor) and value.device != device:
        return value.to(device, non_blocking=True)
    return value


def default_count_items(batch: Any) -> int:
    """The batch size: the first dimension of the targets."""
    targets = batch[1]
    return int(targets.shape[0]) if isinstance(targets, torch.Tensor) else len(targets)


class AccumulatingStep:
    """Ignite process function for one window of micro-batches.

    For window t with micro-batches of n_b items and N_t = sum n_b, each micro-batch
    contributes s_b = mean_loss_b * n_b / N_t to backward, so the accumulated gradient
    is the gradient of the window's item-weighted mean loss, whatever the batch sizes.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        device: torch.device,
        prepare: Prepare = default_prepare,
        count_items: CountItems = default_count_items,
        grad_clip_norm: float | None = None,
        report_grad_norm: bool = False,
        precision: str = "fp32",
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.prepare = prepare
        self.count_items = count_items
        self.grad_clip_norm = grad_clip_norm
        self.report_grad_norm = report_grad_norm
        self.precision = precision
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._zero = torch.zeros((), dtype=torch.float64, device=device)
        self.totals = Totals(epoch=0, loss_sum=self._zero.clone())
        bf16 = precision == "bf16"
        self._autocast: AbstractContextManager[Any] = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        )

    @property
    def steps(self) -> int:
        """Optimizer steps taken since the run started."""
        return self.totals.run_steps

    def totals_for(self, epoch: int) -> Totals:
        """The running totals of ``epoch``, started fresh when a new epoch begins."""
        t = self.totals
        if t.epoch != epoch:
            t = self.totals = Totals(
                epoch=epoch, loss_sum=self._zero.clone(), run_items=t.run_items, run_steps=t.run_steps
            )
        return t

    def _clear_grads(self) -> None:
        """``zero_grad(set_to_none=True)`` without the optimizer's per-call profiling overhead."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def _count(self, window: Window) -> list[int]:
        counts = [int(self.count_items(b)) for b in window.batches]
        if any(n < 0 for n in counts):
            msg = f"count_items returned a negative count {min(counts)}"
            raise ValueError(msg)
        return counts

    def _backward(self, batch: Any, position: int, first: int, n: int, total: int) -> MicroBatchOutput:
        """Forward and backward one micro-batch with loss scaled by n_b / N_t."""
        if n == 0:
            nan = torch.full((), math.nan, device=self.device)
            return MicroBatchOutput(position, first + position - 1, 0, 0.0, nan, nan.new_zeros(()))
        inputs, targets = self.prepare(batch, self.device)
        scale = n / total
        with self._autocast:
            raw = self.loss_fn(self.model(inputs), targets)
            loss = raw * scale
        loss.backward()
        return MicroBatchOutput(position, first + position - 1, n, scale, raw.detach(), loss.detach())

    def _step(self, engine: Engine) -> torch.Tensor | None:
        """Clip (optionally), then step the optimizer and scheduler; returns the gradient norm."""
        grad_norm: torch.Tensor | None = None
        if self.grad_clip_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip_norm).detach()
        elif self.report_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._params, math.inf).detach()
        _fire(engine, TraintelEvents.OPTIMIZER_STEP_STARTED)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self._clear_grads()
        return grad_norm

    def __call__(self, engine: Engine, window: Window) -> torch.Tensor:
        if not self.model.training:
            self.model.train()
        state: Any = engine.state  # Ignite's State takes extra attributes; mypy cannot see them
        counts = self._count(window)
        total = sum(counts)
        self._clear_grads()  # a no-op after a completed step; clears anything left by a failed one
        micro: list[MicroBatchOutput] = []
        for position, (batch, n) in enumerate(zip(window.batches, counts, strict=True), start=1):
            out = self._backward(batch, position, window.first_batch, n, total)
            micro.append(out)
            state.micro_batch = out
            _fire(engine, TraintelEvents.MICRO_BATCH_COMPLETED)

        lr = float(self.optimizer.param_groups[0]["lr"])
        grad_norm = self._step(engine) if total else None
        step_loss = _sum([m.loss for m in micro if m.items], self._zero)
        totals = self.totals_for(engine.state.epoch)
        if total:
            totals.loss_sum.add_(step_loss, alpha=total)
            totals.steps += 1
            totals.run_steps += 1
        totals.items += total
        totals.batches += len(micro)
        totals.run_items += total
        state.step_output = StepOutput(
            epoch=engine.state.epoch,
            step=totals.run_steps,
            window=window,
            items=total,
            micro=tuple(micro),
            loss=step_loss,
            items_total=totals.run_items,
            lr=lr,
            grad_norm=grad_norm,
            skipped=total == 0,
        )
        return step_loss


def _sum(values: list[torch.Tensor], zero: torch.Tensor) -> torch.Tensor:
    """Sum 0-d tensors in float64, left to right (k small kernel launches for k values)."""
    if not values:
        return zero
    total = values[0].double()
    for v in values[1:]:
        total = total + v  # float64 + float32 promotes to float64: no rounding of the terms
    return total


def _fire(engine: Engine, event: TraintelEvents) -> None:
    """Fire a registered traintel event.

    ``Engine.fire_event`` first checks the event against every allowed event with a
    slow ``__eq__`` (about 5 us a call); these events are registered by
    ``create_trainer``, so the check is skipped, and so is the call when nothing listens.
    """
    if engine._event_handlers[event]:
        engine._fire_event(event)
