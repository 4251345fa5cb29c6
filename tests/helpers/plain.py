"""The plain PyTorch loop traintel's runs are compared with: windows of k micro-batches, each
micro-batch's mean loss scaled by its items over the window's before ``backward()``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]


def plain_loop(
    model: torch.nn.Module,
    batches: Sequence[Any],
    k: int,
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Any = None,
    epochs: int = 1,
    max_steps: int | None = None,
    forward: Forward | None = None,
    loss: Callable[[Any], torch.Tensor] | None = None,
    items: Callable[[Any], int] | None = None,
) -> tuple[list[float], list[float]]:
    """Each step's loss (the float64 sum of mean_b * n_b / N, left to right) and learning rate, for
    ``epochs`` passes (or until ``max_steps`` steps); ``forward`` calls the model (default: itself,
    for a compiled one: the compiled module). Batches are ``(x, y)`` with the MSE of ``forward(x)``
    as mean_b and ``len(y)`` as n_b, unless ``loss(batch)`` and ``items(batch)`` say otherwise."""
    call = forward or model
    mean = loss or (lambda batch: torch.nn.functional.mse_loss(call(batch[0]), batch[1]))
    count = items or (lambda batch: len(batch[1]))
    losses: list[float] = []
    lrs: list[float] = []
    for _ in range(epochs):
        for start in range(0, len(batches), k):
            if len(losses) == max_steps:
                return losses, lrs
            window = batches[start : start + k]
            total = sum(count(batch) for batch in window)
            step = 0.0
            for batch in window:
                share = mean(batch) * (count(batch) / total)
                share.backward()
                step += float(share.detach())
            losses.append(step)
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return losses, lrs
