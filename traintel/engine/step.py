"""The update step: one optimizer step over one accumulation window, scaled by items."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import torch
from ignite.engine import Engine

from traintel.engine.events import TraintelEvents
from traintel.engine.state import Deferred, TraintelState
from traintel.engine.windows import Window

Prepare = Callable[[Any, torch.device], tuple[Any, Any]]
CountItems = Callable[[Any], int]
LossFn = Callable[[Any, Any], torch.Tensor]


class MicroBatchOutput(NamedTuple):
    """One micro-batch: the tensors given to backward, detached, still on the device.

    Built for ``MICRO_BATCH_COMPLETED`` listeners (``state.micro_batch``) and on demand
    from ``StepOutput.micro``; the update step itself keeps flat tuples.
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


class WindowLoss(Deferred):
    """The objective of one optimizer step: the float64 sum, left to right, of the window's s_b
    (micro-batches with items only; 0.0 for a window without any).

    Summed on first ``resolve()``, which ``state.output`` and ``StepOutput.loss`` call: a
    step whose loss nobody reads costs no tensor operation for it. The telemetry sums the
    same s_b as Python floats in the same order, which gives the same float64 value.
    """

    __slots__ = ("_counts", "_losses", "_value", "_zero")

    def __init__(self, losses: Sequence[torch.Tensor], counts: Sequence[int], zero: torch.Tensor) -> None:
        self._losses = losses
        self._counts = counts
        self._zero = zero
        self._value: torch.Tensor | None = None

    def resolve(self) -> torch.Tensor:
        value = self._value
        if value is None:
            for v, n in zip(self._losses, self._counts, strict=True):  # float64 + float32: exact terms
                if n:
                    value = v.double() if value is None else value + v
            value = self._value = self._zero.clone() if value is None else value
        return value


class Totals:
    """Running totals of one epoch (started fresh when the next epoch starts) and of the run.

    ``loss_sum`` is a float64 tensor on the device (no host sync): the sum over the epoch's
    windows of ``N_t * sum of s_b``, i.e. the sum of per-item losses. Windows are added to it
    in groups, with a few tensor operations per ``FOLD_EVERY`` windows instead of one or more
    per window; reading ``loss_sum`` adds the waiting ones first.
    """

    FOLD_EVERY = 64

    __slots__ = ("_loss_sum", "_waiting", "batches", "epoch", "items", "run_items", "run_steps", "steps")

    def __init__(self, epoch: int, loss_sum: torch.Tensor, *, run_items: int = 0, run_steps: int = 0) -> None:
        self.epoch = epoch
        self._loss_sum = loss_sum
        self._waiting: list[tuple[Sequence[torch.Tensor], int]] = []
        self.items = 0
        self.batches = 0
        self.steps = 0
        self.run_items = run_items
        self.run_steps = run_steps

    @property
    def loss_sum(self) -> torch.Tensor:
        self.fold()
        return self._loss_sum

    def add_window(self, losses: Sequence[torch.Tensor], items: int) -> None:
        """Count a window's s_b (the loss of a micro-batch without items is 0) with weight N_t."""
        waiting = self._waiting
        waiting.append((losses, items))
        if len(waiting) >= self.FOLD_EVERY:
            self.fold()

    def fold(self) -> None:
        """Add the waiting windows: per distinct N_t, ``N_t * sum of their s_b`` in float64."""
        waiting = self._waiting
        if not waiting:
            return
        self._waiting = []
        by_items: dict[int, list[torch.Tensor]] = {}
        for losses, items in waiting:
            by_items.setdefault(items, []).extend(losses)
        for items, losses in by_items.items():
            self._loss_sum.add_(torch.stack(losses).sum(dtype=torch.float64), alpha=items)


class StepOutput(NamedTuple):
    """One optimizer step. Tensors stay on the device; handlers convert them when they emit."""

    epoch: int
    step: int
    """Optimizer steps completed, including this one (unchanged when skipped)."""
    window: Window
    items: int
    """N_t."""
    counts: tuple[int, ...]
    """n_b of each micro-batch, in window order."""
    raw_losses: tuple[torch.Tensor, ...]
    """mean_loss_b of each micro-batch, detached (NaN for one with no items)."""
    losses: tuple[torch.Tensor, ...]
    """s_b = mean_loss_b * n_b / N_t of each micro-batch: exactly what went to backward, detached."""
    window_loss: WindowLoss
    """The step's objective, summed when first read (``loss``)."""
    items_total: int
    """Items processed since the run started, including this window."""
    lr: float
    """Learning rate of the first parameter group used by this step."""
    grad_norm: torch.Tensor | None
    skipped: bool

    @property
    def loss(self) -> torch.Tensor:
        """Sum of the window's s_b, float64, detached, on the device: the objective of this step."""
        return self.window_loss.resolve()

    def scale(self, position: int) -> float:
        """n_b / N_t of the micro-batch at 0-based ``position`` (the same division the step made)."""
        n = self.counts[position]
        return n / self.items if n else 0.0

    @property
    def micro(self) -> tuple[MicroBatchOutput, ...]:
        """The window's micro-batches as ``MicroBatchOutput`` tuples (built on each access)."""
        first = self.window.first_batch
        return tuple(
            MicroBatchOutput(i + 1, first + i, n, self.scale(i), raw, loss)
            for i, (n, raw, loss) in enumerate(zip(self.counts, self.raw_losses, self.losses, strict=True))
        )


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
    return _items(batch[1])


class AccumulatingStep:
    """Ignite process function for one window of micro-batches.

    For window t with micro-batches of n_b items and N_t = sum n_b, each micro-batch
    contributes s_b = mean_loss_b * n_b / N_t to backward, so the accumulated gradient
    is the gradient of the window's item-weighted mean loss, whatever the batch sizes.

    The step runs once per optimizer step on the training thread, so its bookkeeping adds
    no tensor operation beyond two detaches per micro-batch: the step loss is a
    ``WindowLoss``, summed when first read, and ``Totals`` adds windows to the epoch total in
    groups. Per-micro-batch outputs are built only while something listens to
    ``MICRO_BATCH_COMPLETED``.
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
        self.totals = Totals(0, self._zero.clone())
        self._autocast: AbstractContextManager[Any] | None = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16" else None
        )

    @property
    def steps(self) -> int:
        """Optimizer steps taken since the run started."""
        return self.totals.run_steps

    def totals_for(self, epoch: int) -> Totals:
        """The running totals of ``epoch``, started fresh when a new epoch begins."""
        t = self.totals
        if t.epoch != epoch:
            t = self.totals = Totals(epoch, self._zero.clone(), run_items=t.run_items, run_steps=t.run_steps)
        return t

    def __call__(self, engine: Engine, window: Window) -> torch.Tensor | WindowLoss:  # noqa: PLR0912, PLR0915
        # One function with no helper calls on the default path: next to torch's kernels every
        # Python call here costs microseconds (measured in benchmarks/overhead.py), so the
        # defaults of prepare and count_items are inlined and the optimizer step is spelled out.
        model = self.model
        if not model.training:
            model.train()
        batches = window.batches
        if self.count_items is default_count_items:  # the targets' first dimension, inlined
            counts = tuple([t.shape[0] if isinstance(t := b[1], torch.Tensor) else len(t) for b in batches])
        else:
            count = self.count_items
            counts = tuple([int(count(b)) for b in batches])
            if counts and min(counts) < 0:
                msg = f"count_items returned a negative count {min(counts)}"
                raise ValueError(msg)
        total = sum(counts)
        optimizer = self.optimizer
        for group in optimizer.param_groups:  # no grads after a completed step; clears what a failed
            for p in group["params"]:  # step or a handler left
                p.grad = None

        device, loss_fn, autocast = self.device, self.loss_fn, self._autocast
        prepare = None if self.prepare is default_prepare else self.prepare
        listeners = engine._event_handlers[_MICRO_BATCH_COMPLETED]
        raws: list[torch.Tensor] = []
        losses: list[torch.Tensor] = []
        for position, batch in enumerate(batches):
            n = counts[position]
            if n:
                if prepare is None:
                    inputs, targets = batch
                    if isinstance(inputs, torch.Tensor) and inputs.device != device:
                        inputs = inputs.to(device, non_blocking=True)
                    if isinstance(targets, torch.Tensor) and targets.device != device:
                        targets = targets.to(device, non_blocking=True)
                else:
                    inputs, targets = prepare(batch, device)
                if autocast is None:
                    raw = loss_fn(model(inputs), targets)
                    loss = raw * (n / total)  # s_b = mean_loss_b * n_b / N_t
                else:
                    with autocast:
                        raw = loss_fn(model(inputs), targets)
                        loss = raw * (n / total)
                loss.backward()
                raw = raw.detach()
                loss = loss.detach()
            else:  # nothing to run: NaN stands for the missing mean, 0 for the missing share
                raw = torch.full((), math.nan, device=device)
                loss = raw.new_zeros(())
            raws.append(raw)
            losses.append(loss)
            if listeners:
                state: Any = engine.state  # Ignite's State takes extra attributes
                state.micro_batch = MicroBatchOutput(
                    position + 1, window.first_batch + position, n, n / total if n else 0.0, raw, loss
                )
                engine._fire_event(_MICRO_BATCH_COMPLETED)

        lr = optimizer.param_groups[0]["lr"]
        if type(lr) is not float:
            lr = float(lr)
        grad_norm: torch.Tensor | None = None
        if total:
            if self.grad_clip_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip_norm).detach()
            elif self.report_grad_norm:
                grad_norm = torch.nn.utils.clip_grad_norm_(self._params, math.inf).detach()
            if engine._event_handlers[_OPTIMIZER_STEP_STARTED]:
                engine._fire_event(_OPTIMIZER_STEP_STARTED)
            optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

        epoch = engine.state.epoch
        totals = self.totals if self.totals.epoch == epoch else self.totals_for(epoch)
        losses_t = tuple(losses)
        if total:
            totals.add_window(losses_t, total)
            totals.steps += 1
            totals.run_steps += 1
        totals.items += total
        totals.batches += len(counts)
        totals.run_items += total
        window_loss = WindowLoss(losses_t, counts, self._zero)
        engine.state.step_output = _new_tuple(  # type: ignore[attr-defined]  # StepOutput without its __new__
            StepOutput,
            (
                epoch,
                totals.run_steps,
                window,
                total,
                counts,
                tuple(raws),
                losses_t,
                window_loss,
                totals.run_items,
                lr,
                grad_norm,
                total == 0,
            ),
        )
        # Ignite stores this as state.output; a TraintelState sums it only when it is read
        return window_loss if type(engine.state) is TraintelState else window_loss.resolve()


_new_tuple = tuple.__new__
_MICRO_BATCH_COMPLETED = TraintelEvents.MICRO_BATCH_COMPLETED  # enum lookups are not free
_OPTIMIZER_STEP_STARTED = TraintelEvents.OPTIMIZER_STEP_STARTED


def _items(targets: Any) -> int:
    """``default_count_items`` given the targets."""
    return int(targets.shape[0]) if isinstance(targets, torch.Tensor) else len(targets)
