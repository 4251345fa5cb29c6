"""The optimizer and the per-optimizer-step LR scheduler: from ``trainer.optimizer`` and
``trainer.scheduler``, or given by the task (objects, or callables that make them)."""

from __future__ import annotations

import fnmatch
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from traintel.config import (
    CosineSchedule,
    ExponentialSchedule,
    FactorySchedule,
    LinearWarmupSchedule,
    NoDecayConfig,
    OneCycleSchedule,
    OptimizerConfig,
    SchedulerConfig,
    StepSchedule,
    WarmupCosineSchedule,
)
from traintel.errors import ConfigError, one_line
from traintel.task import Task, import_factory


def class_name(obj: object) -> str:
    """``torch.optim.adamw.AdamW``: the class an optimizer or scheduler is, for the resume check."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _torch_optimizer(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` class of a lower-case name (the config checked it is one of
    ``OPTIMIZERS``); a torch too old for it is a ConfigError."""
    for attr in dir(torch.optim):
        cls = getattr(torch.optim, attr)
        if attr.lower() == name and isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
            return cls
    raise ConfigError("trainer.optimizer.name", f"torch {torch.__version__} has no optimizer {name!r}")


def parameter_groups(
    model: torch.nn.Module, no_decay: NoDecayConfig | None
) -> list[torch.nn.Parameter] | list[dict[str, Any]]:
    """The model's trainable parameters; with ``no_decay``, two groups in the model's order: the
    others (the optimizer's ``weight_decay``) and those matched (``weight_decay: 0``). A pattern or
    class that matches no trainable parameter is a ConfigError: it is a typo or a wrong model."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if no_decay is None:
        return [p for _, p in named]
    owners: dict[int, tuple[str, ...]] = {}  # parameter -> the class names of the module holding it
    for module in model.modules():
        classes = tuple(c.__name__ for c in type(module).__mro__)
        for p in module.parameters(recurse=False):
            owners[id(p)] = classes
    matched: set[int] = set()
    for i, pattern in enumerate(no_decay.names):
        hits = {id(p) for n, p in named if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            example = named[0][0] if named else "none"
            raise ConfigError(
                f"trainer.optimizer.no_decay.names[{i}]",
                f"{pattern!r} matches no trainable parameter of the model (a name: {example!r})",
            )
        matched |= hits
    for i, cls in enumerate(no_decay.modules):
        hits = {id(p) for _, p in named if cls in owners.get(id(p), ())}
        if not hits:
            raise ConfigError(
                f"trainer.optimizer.no_decay.modules[{i}]",
                f"no module of class {cls!r} holds a trainable parameter of the model",
            )
        matched |= hits
    decay = [p for _, p in named if id(p) not in matched]
    kept = [p for _, p in named if id(p) in matched]
    groups: list[dict[str, Any]] = [{"params": decay}] if decay else []
    return [*groups, {"params": kept, "weight_decay": 0.0}]


def build_optimizer(cfg: OptimizerConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``trainer.optimizer``: a torch optimizer by name, or a ``module:function`` called like one,
    with ``lr`` and the other keys as keyword arguments; an argument it does not take, or one it
    rejects, is a ConfigError naming the key."""
    extras = dict(cfg.model_extra or {})
    factory = ":" in cfg.name
    make: Callable[..., Any] = (
        import_factory(cfg.name, "trainer.optimizer.name") if factory else _torch_optimizer(cfg.name)
    )
    accepted = _parameters(make)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    if accepted and not takes_any:
        for key in sorted(extras):
            if key not in accepted or key in ("params", "lr"):
                takes = ", ".join(k for k in accepted if k not in ("params", "lr", "self"))
                raise ConfigError(
                    f"trainer.optimizer.{key}", f"{cfg.name} takes no such argument (it takes {takes})"
                )
        if cfg.no_decay is not None and "weight_decay" not in accepted:
            raise ConfigError("trainer.optimizer.no_decay", f"{cfg.name} has no weight_decay to leave out")
    params = parameter_groups(model, cfg.no_decay)
    try:
        optimizer = make(params, lr=cfg.lr, **extras)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            "trainer.optimizer", f"{cfg.name} rejected its arguments: {one_line(exc)}"
        ) from None
    except Exception as exc:
        raise ConfigError("trainer.optimizer.name", f"{cfg.name} raised {one_line(exc)}") from None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            "trainer.optimizer.name",
            f"{cfg.name} returned {type(optimizer).__name__}, not a torch.optim.Optimizer",
        )
    return optimizer


def task_optimizer(task: Task, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The task's optimizer: the object, or what its callable makes of the model; it must optimize
    the model's own parameters (not those of a model built before, or elsewhere)."""
    given = task.optimizer
    if isinstance(given, torch.optim.Optimizer):
        optimizer = given
    elif callable(given):
        optimizer = _made("task.optimizer", given, model)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                "task.optimizer", f"returned {type(optimizer).__name__}, not a torch.optim.Optimizer"
            )
    else:
        raise ConfigError(
            "task.optimizer",
            f"must be a torch.optim.Optimizer or a callable taking the model, got {type(given).__name__}",
        )
    own = {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        if any(id(p) not in own for p in group["params"]):
            raise ConfigError(
                "task.optimizer",
                "holds parameters that are not the model's; build it from task.model's parameters "
                "(or give a callable taking the model)",
            )
    return optimizer


def task_scheduler(task: Task, optimizer: torch.optim.Optimizer) -> Any:
    """The task's scheduler: the object, or what its callable makes of the optimizer; it must
    schedule that optimizer and be stepped without a metric."""
    given = task.scheduler
    if not isinstance(given, type) and _is_scheduler(given):
        scheduler = given
    elif callable(given):
        scheduler = _made("task.scheduler", given, optimizer)
    else:
        raise ConfigError(
            "task.scheduler",
            f"must be a scheduler or a callable taking the optimizer, got {type(given).__name__}",
        )
    if not _is_scheduler(scheduler):
        raise ConfigError(
            "task.scheduler", f"{type(scheduler).__name__} is not a scheduler (it needs step and state_dict)"
        )
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ConfigError(
            "task.scheduler",
            "ReduceLROnPlateau is stepped with a metric; traintel steps a scheduler once per optimizer "
            "step, without one (step it from your own handler instead)",
        )
    if getattr(scheduler, "optimizer", optimizer) is not optimizer:
        raise ConfigError("task.scheduler", "schedules another optimizer than the run's")
    return scheduler


def _made(key: str, make: Callable[[Any], Any], argument: Any) -> Any:
    """What the task's callable makes of ``argument``; its exception is a ConfigError of ``key``."""
    try:
        return make(argument)
    except Exception as exc:
        raise ConfigError(key, f"raised {one_line(exc)}") from None


def _is_scheduler(value: Any) -> bool:
    """Whether ``value`` can be stepped and checkpointed as a learning-rate scheduler."""
    return hasattr(value, "step") and hasattr(value, "state_dict")


def build_scheduler(
    cfg: SchedulerConfig | None, optimizer: torch.optim.Optimizer, total_steps: int | None
) -> Any:
    """``trainer.scheduler``: a scheduler stepped once per optimizer step (its arguments were checked
    by the config's models; what only the optimizer or the run's length decides is checked here).
    ``total_steps``: the run's optimizer steps, None when the loader has no length."""
    sched = torch.optim.lr_scheduler
    match cfg:
        case None:
            return None
        case CosineSchedule(T_max=t_max, eta_min=eta_min):
            t_max = _length("T_max", t_max, total_steps)
            return sched.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=eta_min)
        case StepSchedule(step_size=step_size, gamma=gamma):
            return sched.StepLR(optimizer, step_size=step_size, gamma=gamma)
        case ExponentialSchedule(gamma=gamma):
            return sched.ExponentialLR(optimizer, gamma=gamma)
        case LinearWarmupSchedule(warmup_steps=warmup):
            return sched.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        case WarmupCosineSchedule() | OneCycleSchedule() | FactorySchedule():
            return _OWN_BUILDERS[type(cfg)](cfg, optimizer, total_steps)
    raise AssertionError(cfg)  # the union has no other member


def _length(key: str, given: int | None, total_steps: int | None) -> int:
    """A schedule's length in optimizer steps: as given, else the run's."""
    if given is not None:
        return given
    if total_steps is None:
        raise ConfigError(f"trainer.scheduler.{key}", "is required when the loader has no length")
    return total_steps


def run_length(cfg: SchedulerConfig | None, total_steps: int | None) -> int | None:
    """The run's optimizer steps when the schedule's length defaults to them (``total_steps``),
    else None: the length a resumed attempt compares with its checkpoint's."""
    match cfg:
        case (
            CosineSchedule(T_max=None)
            | WarmupCosineSchedule(total_steps=None)
            | OneCycleSchedule(total_steps=None)
        ):
            return total_steps
        case FactorySchedule():
            return total_steps if _given_run_length(cfg) else None
    return None


def _given_run_length(cfg: FactorySchedule) -> bool:
    """Whether a ``module:function`` scheduler is given ``total_steps``, the run's optimizer steps: it
    takes that argument and the config does not set it."""
    takes = _parameters(import_factory(cfg.name, "trainer.scheduler.name"))
    return "total_steps" in takes and "total_steps" not in (cfg.model_extra or {})


def length_change(
    cfg: SchedulerConfig | None, before: int, after: int, step: int, optimizer: torch.optim.Optimizer
) -> str:
    """What the learning rate does when a resumed attempt at ``step`` makes a run of ``before``
    optimizer steps one of ``after`` (``run_length``), as one warning line; a ConfigError where the
    scheduler cannot go on (one-cycle past its end)."""
    name = getattr(cfg, "name", "")
    if isinstance(cfg, OneCycleSchedule):
        if after > before:
            raise ConfigError(
                "trainer.max_epochs",
                f"the onecycle schedule was set for {before} optimizer steps when the run began, and this "
                f"attempt would train to step {after}, past its end; keep the run at {before} steps or set "
                "trainer.scheduler.total_steps when a run begins",
            )
        return (
            f"trainer.scheduler: onecycle keeps its {before} steps from when the run began; this attempt "
            f"ends at step {after}, before the cycle does"
        )
    if isinstance(cfg, CosineSchedule):
        if after > before:
            return (
                f"trainer.scheduler: cosine keeps its {before} steps from when the run began; this attempt "
                f"trains to step {after}, so after step {before} the learning rate rises again"
            )
        return (
            f"trainer.scheduler: cosine keeps its {before} steps from when the run began; this attempt ends "
            f"at step {after}, before the learning rate reaches eta_min"
        )
    if isinstance(cfg, WarmupCosineSchedule):
        peak = float(optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"]))
        floor = cfg.min_lr / peak
        was = peak * warmup_cosine_factor(step, cfg.warmup_steps, before, floor)
        now = peak * warmup_cosine_factor(step, cfg.warmup_steps, after, floor)
        return (
            f"trainer.scheduler: warmup_cosine was {before} steps long and is {after} from step {step + 1}, "
            f"where the learning rate goes from {was:.6g} to {now:.6g}; it reaches min_lr at step {after}"
        )
    return (
        f"trainer.scheduler: {name} was made for {before} steps and this attempt trains to step {after}; "
        "its state comes from the checkpoint, so what the learning rate does then is the scheduler's"
    )


def warmup_cosine_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """The multiple of the peak learning rate at optimizer step ``step + 1`` of ``total``: a ramp
    of ``warmup`` steps to 1 (step 1 at 1/warmup), then a half cosine to ``floor`` at the last step
    (``floor`` after it)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step + 1 - warmup) / (total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _warmup_cosine(cfg: Any, optimizer: torch.optim.Optimizer, total_steps: int | None) -> Any:
    total = _length("total_steps", cfg.total_steps, total_steps)
    if cfg.warmup_steps >= total:
        raise ConfigError(
            "trainer.scheduler.warmup_steps",
            f"must be less than the schedule's {total} optimizer steps, got {cfg.warmup_steps}",
        )
    floors = []
    for group in optimizer.param_groups:
        peak = float(group["lr"])
        if cfg.min_lr > peak:
            raise ConfigError(
                "trainer.scheduler.min_lr", f"must not exceed the learning rate {peak}, got {cfg.min_lr}"
            )
        floors.append(cfg.min_lr / peak)
    warmup = cfg.warmup_steps

    def factor(floor: float) -> Callable[[int], float]:  # a function: LambdaLR saves no state of it
        return lambda step: warmup_cosine_factor(step, warmup, total, floor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(floor) for floor in floors])


def _one_cycle(cfg: Any, optimizer: torch.optim.Optimizer, total_steps: int | None) -> Any:
    total = _length("total_steps", cfg.total_steps, total_steps)
    max_lr = cfg.max_lr if cfg.max_lr is not None else float(optimizer.param_groups[0]["lr"])
    if cfg.cycle_momentum and not {"momentum", "betas"} & optimizer.defaults.keys():
        raise ConfigError(
            "trainer.scheduler.cycle_momentum",
            f"{type(optimizer).__name__} has no momentum or beta1 to cycle; set it to false",
        )
    try:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=max_lr,
            total_steps=total,
            pct_start=cfg.pct_start,
            anneal_strategy=cfg.anneal_strategy,
            div_factor=cfg.div_factor,
            final_div_factor=cfg.final_div_factor,
            three_phase=cfg.three_phase,
            cycle_momentum=cfg.cycle_momentum,
            base_momentum=cfg.base_momentum,
            max_momentum=cfg.max_momentum,
        )
    except ValueError as exc:  # what torch checks beyond the config's models
        raise ConfigError("trainer.scheduler", f"onecycle: {one_line(exc)}") from None


def _factory_scheduler(
    cfg: FactorySchedule, optimizer: torch.optim.Optimizer, total_steps: int | None
) -> Any:
    make = import_factory(cfg.name, "trainer.scheduler.name")
    arguments = dict(cfg.model_extra or {})
    if total_steps is not None and _given_run_length(cfg):
        arguments["total_steps"] = total_steps
    try:
        inspect.signature(make).bind(optimizer, **arguments)
    except TypeError as exc:
        raise ConfigError("trainer.scheduler", f"{cfg.name} does not take these arguments: {exc}") from None
    except ValueError:
        pass
    try:
        scheduler = make(optimizer, **arguments)
    except Exception as exc:
        raise ConfigError("trainer.scheduler.name", f"{cfg.name} raised {one_line(exc)}") from None
    if not _is_scheduler(scheduler):
        raise ConfigError(
            "trainer.scheduler.name",
            f"{cfg.name} returned {type(scheduler).__name__}, not a scheduler (it needs step and state_dict)",
        )
    return scheduler


_OWN_BUILDERS: dict[type, Callable[[Any, torch.optim.Optimizer, int | None], Any]] = {
    WarmupCosineSchedule: _warmup_cosine,
    OneCycleSchedule: _one_cycle,
    FactorySchedule: _factory_scheduler,
}
"""The schedules that are not one torch scheduler with the config's arguments."""


def _parameters(fn: Callable[..., Any]) -> Mapping[str, inspect.Parameter]:
    """A callable's parameters by name; none when it has no signature to read (the call reports)."""
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
