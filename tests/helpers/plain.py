"""The plain PyTorch loop traintel's runs are compared with: windows of k micro-batches, each
micro-batch's mean loss scaled by its items over the window's before ``backward()``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]


def plain_loop(
    model: torch.nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    k: int,
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Any = None,
    epochs: int = 1,
    max_steps: int | None = None,
    forward: Forward | None = None,
) -> tuple[list[float], list[float]]:
    """Each step's loss (the float64 sum of mean_b * n_b / N, left to right) and learning rate, for
    ``epochs`` passes (or until ``max_steps`` steps); ``forward`` calls the model (default: itself,
    for a compiled one: the compiled module)."""
    call = forward or model
    losses: list[float] = []
    lrs: list[float] = []
    for _ in range(epochs):
        for start in range(0, len(batches), k):
            if len(losses) == max_steps:
                return losses, lrs
            window = batches[start : start + k]
            total = sum(len(y) for _, y in window)
            step = 0.0
            for x, y in window:
                share = torch.nn.functional.mse_loss(call(x), y) * (len(y) / total)
                share.backward()
                step += float(share.detach())
            losses.append(step)
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return losses, lrs
