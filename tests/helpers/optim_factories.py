"""``module:function`` optimizers and schedulers for the config's factory settings."""

from __future__ import annotations

from typing import Any

import torch


def nesterov_sgd(params: Any, lr: float, momentum: float = 0.5) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, called like a torch optimizer."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True)


def not_an_optimizer(params: Any, lr: float) -> object:
    """Returns something that is not an optimizer."""
    return [params, lr]


def halving(optimizer: torch.optim.Optimizer, total_steps: int, every: int = 1) -> Any:
    """Halves the rate every ``every`` steps; records the run's length it was given."""
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=every, gamma=0.5)
    scheduler.given_total = total_steps  # type: ignore[attr-defined]
    return scheduler
