"""Build the optimizer and the per-optimizer-step LR scheduler from config."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from traintel.config import (
    CosineSchedule,
    ExponentialSchedule,
    LinearWarmupSchedule,
    OptimizerConfig,
    SchedulerConfig,
    StepSchedule,
)
from traintel.errors import ConfigError

_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


def _extras(cfg: OptimizerConfig) -> dict[str, Any]:
    return dict(cfg.model_extra or {})


def build_optimizer(cfg: OptimizerConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``trainer.optimizer``: name, lr and any further keyword arguments of that optimizer."""
    make = _OPTIMIZERS[cfg.name]
    try:
        return make(params, lr=cfg.lr, **_extras(cfg))
    except (TypeError, ValueError) as exc:
        raise ConfigError("trainer.optimizer", f"{cfg.name} rejected its arguments: {exc}") from None


def build_scheduler(
    cfg: SchedulerConfig | None, optimizer: torch.optim.Optimizer, total_steps: int | None
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``trainer.scheduler``: a torch scheduler stepped once per optimizer step (its arguments were
    checked by the config's models)."""
    sched = torch.optim.lr_scheduler
    match cfg:
        case None:
            return None
        case CosineSchedule(T_max=t_max, eta_min=eta_min):
            if t_max is None:
                if total_steps is None:
                    raise ConfigError("trainer.scheduler.T_max", "is required when the loader has no length")
                t_max = total_steps
            return sched.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=eta_min)
        case StepSchedule(step_size=step_size, gamma=gamma):
            return sched.StepLR(optimizer, step_size=step_size, gamma=gamma)
        case ExponentialSchedule(gamma=gamma):
            return sched.ExponentialLR(optimizer, gamma=gamma)
        case LinearWarmupSchedule(warmup_steps=warmup):
            return sched.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    raise AssertionError(cfg)  # the union has no other member
