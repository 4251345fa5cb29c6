"""The update step: one optimizer step over one accumulation window, scaled by items."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from ignite.engine import Engine

from traintel.engine.events import TraintelEvents
from traintel.engine.windows import Window

Prepare = Callable[[Any, torch.device], tuple[Any, Any]]
CountItems = Callable[[Any], int]
LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass(frozen=True, slots=True)
class MicroBatchOutput:
    """One micro-batch: the tensors given to backward, detached, still on the device."""

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


@dataclass(frozen=True, slots=True)
class StepOutput:
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
    item_loss_sum: torch.Tensor
    """loss * N_t, float64: the window's sum of per-item losses (sum of raw_loss_b * n_b)."""
    lr: float
    """Learning rate of the first parameter group used by this step."""
    grad_norm: torch.Tensor | None
    skipped: bool


def default_prepare(batch: Any, device: torch.device) -> tuple[Any, Any]:
    """``(inputs, targets)`` moved to ``device``."""
    inputs, targets = batch
    return _to(inputs, device), _to(targets, device)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    return value


def default_count_items(batch: Any) -> int:
    """The batch size: the first dimension of the targets."""
    targets = batch[1]
    return len(targets)


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
        self.steps = 0
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._zero = torch.zeros((), dtype=torch.float64, device=device)

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _clear_grads(self) -> None:
        """``zero_grad(set_to_none=True)`` without the optimizer's per-call profiling overhead."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def __call__(self, engine: Engine, window: Window) -> torch.Tensor:
        if not self.model.training:
            self.model.train()
        state: Any = engine.state  # Ignite's State takes extra attributes; mypy cannot see them
        counts = [int(self.count_items(b)) for b in window.batches]
        if any(n < 0 for n in counts):
            msg = f"count_items returned a negative count {min(counts)}"
            raise ValueError(msg)
        total = sum(counts)
        self._clear_grads()  # a no-op after a completed step; clears anything left by a failed one
        micro: list[MicroBatchOutput] = []
        losses: list[torch.Tensor] = []
        for position, (batch, n) in enumerate(zip(window.batches, counts, strict=True), start=1):
            if n == 0:
                nan = torch.full((), math.nan, device=self.device)
                out = MicroBatchOutput(
                    position, window.first_batch + position - 1, 0, 0.0, nan, nan.new_zeros(())
                )
            else:
                inputs, targets = self.prepare(batch, self.device)
                scale = n / total
                with self._autocast():
                    raw = self.loss_fn(self.model(inputs), targets)
                    loss = raw * scale
                loss.backward()
                raw_d, loss_d = raw.detach(), loss.detach()
                out = MicroBatchOutput(position, window.first_batch + position - 1, n, scale, raw_d, loss_d)
                losses.append(loss_d)
            micro.append(out)
            state.micro_batch = out
            _fire(engine, TraintelEvents.MICRO_BATCH_COMPLETED)

        lr = float(self.optimizer.param_groups[0]["lr"])
        grad_norm: torch.Tensor | None = None
        skipped = total == 0
        if not skipped:
            if self.grad_clip_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip_norm).detach()
            elif self.report_grad_norm:
                grad_norm = torch.nn.utils.clip_grad_norm_(self._params, math.inf).detach()
            _fire(engine, TraintelEvents.OPTIMIZER_STEP_STARTED)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.steps += 1
            self._clear_grads()
        step_loss = _sum(losses, self._zero)
        output = StepOutput(
            epoch=engine.state.epoch,
            step=self.steps,
            window=window,
            items=total,
            micro=tuple(micro),
            loss=step_loss,
            item_loss_sum=step_loss * total if total else self._zero,
            lr=lr,
            grad_norm=grad_norm,
            skipped=skipped,
        )
        state.step_output = output
        return step_loss


def _sum(values: list[torch.Tensor], zero: torch.Tensor) -> torch.Tensor:
    """Sum 0-d tensors in float64 (two kernel launches whatever their number)."""
    if not values:
        return zero
    return torch.stack(values).sum(dtype=torch.float64)


def _fire(engine: Engine, event: TraintelEvents) -> None:
    """Fire a registered traintel event.

    ``Engine.fire_event`` first checks the event against every allowed event with a
    slow ``__eq__`` (about 5 us a call); these events are registered by
    ``create_trainer``, so the check is skipped, and so is the call when nothing listens.
    """
    if engine._event_handlers[event]:
        engine._fire_event(event)
