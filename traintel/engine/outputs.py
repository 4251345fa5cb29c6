"""What the update step hands its handlers: one micro-batch, one optimizer step."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import torch

from traintel.engine.loss import WindowLoss
from traintel.engine.windows import Window


class MicroBatchOutput(NamedTuple):
    """One micro-batch (``state.micro_batch`` from its ``MICRO_BATCH_COMPLETED`` on): the tensors given
    to backward, detached, still on the device."""

    position: int
    """1-based position in the window."""
    batch: int
    """1-based index in the epoch."""
    items: int
    """n_b."""
    scale: float
    """n_b / N (``loss_scale``; 0.0 for a micro-batch with no items)."""
    raw_loss: torch.Tensor
    """mean_loss_b (NaN when the micro-batch has no items and was not run)."""
    loss: torch.Tensor
    """s_b = raw_loss * scale: exactly what went to backward."""


class StepOutput(NamedTuple):
    """One optimizer step. Tensors stay on the device; handlers convert them when they emit."""

    epoch: int
    step: int
    """Optimizer steps completed, including this one (unchanged when skipped)."""
    window: Window
    items: int
    """N: the window's items."""
    counts: tuple[int, ...]
    """n_b of each micro-batch, in window order."""
    raw_losses: tuple[torch.Tensor, ...]
    """mean_loss_b of each micro-batch, detached (NaN for one with no items)."""
    losses: tuple[torch.Tensor, ...]
    """s_b = mean_loss_b * n_b / N of each micro-batch: exactly what went to backward, detached."""
    window_loss: WindowLoss
    """The step's objective, summed when first read (``loss``)."""
    items_total: int
    """Items processed since the run started, including this window."""
    lr: float
    """Learning rate of the first parameter group used by this step."""
    grad_norm: torch.Tensor | None
    skipped: bool
    """No optimizer step: the window held no items, its loss was not finite under
    ``trainer.on_nonfinite=skip_step``, or its gradients overflowed under fp16."""
    grad_scale: float | None = None
    """The gradient scaler's factor this step's backward ran with (``precision="fp16"``), else None."""
    metrics: Mapping[str, torch.Tensor] = MappingProxyType({})
    """The task's training metrics of this step on this rank (``Task.train_metrics``), one-element
    tensors on the device; converted with the step's losses when its records are delivered."""
    outputs: tuple[tuple[Any, Any], ...] = ()
    """``(output, target)`` of each micro-batch that ran (the model's output and the targets, or what
    ``forward_loss`` returned and the batch): set only while the training metrics are computed from
    it, so that no step holds on to the previous one's outputs."""

    @property
    def loss(self) -> torch.Tensor:
        """Sum of the window's s_b, float64, detached, on the device: the objective of this step."""
        return self.window_loss.resolve()
