"""Build the optimizer and the per-optimizer-step LR scheduler from config."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from traintel.config import OptimizerConfig, SchedulerConfig
from traintel.errors import ConfigError

_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


def _extras(cfg: Any) -> dict[str, Any]:
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
    """``trainer.scheduler``: a torch scheduler stepped once per optimizer step."""
    if cfg is None:
        return None
    kwargs = _extras(cfg)
    sched = torch.optim.lr_scheduler
    try:
        if cfg.name == "cosine":
            if "T_max" not in kwargs:
                if total_steps is None:
                    raise ConfigError("trainer.scheduler.T_max", "is required when the loader has no length")
                kwargs["T_max"] = total_steps
            return sched.CosineAnnealingLR(optimizer, **kwargs)
        if cfg.name == "step":
            return sched.StepLR(optimizer, **kwargs)
        if cfg.name == "exponential":
            return sched.ExponentialLR(optimizer, **kwargs)
        warmup = kwargs.pop("warmup_steps", None)
        if kwargs:
            raise ConfigError(
                "trainer.scheduler", f"linear_warmup takes only warmup_steps, got {sorted(kwargs)}"
            )
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
            raise ConfigError("trainer.scheduler.warmup_steps", f"must be an integer >= 1, got {warmup!r}")
        return sched.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    except (TypeError, ValueError) as exc:
        raise ConfigError("trainer.scheduler", f"{cfg.name} rejected its arguments: {exc}") from None
