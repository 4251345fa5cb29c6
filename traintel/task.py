"""The task contract: what a ``task.factory`` returns, and how it is loaded and checked."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from traintel.errors import ConfigError, one_line

if TYPE_CHECKING:
    import torch


@dataclass(kw_only=True)
class Task:
    """What a factory returns (any object with these attributes will do).

    The loss is ``loss_fn(output, target)`` on the model's output, or ``forward_loss(model,
    batch)`` for a model that computes its own; either must return the mean loss over the batch's
    items. Batches are ``(inputs, targets)`` unless ``prepare(batch, device)`` is given;
    ``count_items(batch)`` returns n_b (default: the batch size). ``optimizer`` and ``scheduler``
    (objects, or callables that make them) replace ``trainer.optimizer`` and ``trainer.scheduler``.
    """

    model: Any
    """The ``torch.nn.Module``, or a zero-argument callable returning one (a model factory), which
    ``build`` calls after seeding torch with ``run.seed``, so that the seed decides its initial weights."""
    train_loader: Iterable[Any]
    loss_fn: Callable[[Any, Any], Any] | None = None
    forward_loss: Callable[[Any, Any], Any] | None = None
    val_loader: Iterable[Any] | None = None
    """The validation data, evaluated as the split ``val``."""
    val_loaders: Mapping[str, Iterable[Any]] | None = None
    """Several named validation loaders instead (``{"val": ..., "test": ...}``), evaluated in this
    order, each giving its own ``eval.epoch`` record with its name as ``split``."""
    metrics: Mapping[str, Any] | None = None
    """Evaluation metrics by name: Ignite ``Metric``s or torchmetrics ``Metric``s, fed each validation
    batch's output and targets (or what ``forward_loss`` returned and the batch), their values in
    each ``eval.epoch`` record's ``metrics``."""
    train_metrics: Mapping[str, Callable[[Any], Any]] | None = None
    """Training metrics by name: ``fn(step_output)`` returning a one-element tensor computed on the
    device from the step's ``outputs`` (each micro-batch's output and targets), its losses and
    counts, after each step whose records are emitted (``telemetry.every``); the values travel with
    the step's ``train.step`` record in ``metrics``."""
    count_items: Callable[[Any], int] | None = None
    prepare: Callable[[Any, Any], Any] | None = None
    optimizer: Any = None
    """A ``torch.optim.Optimizer`` over the model's parameters, or a callable taking the model (on
    its device) and returning one."""
    scheduler: Any = None
    """A learning-rate scheduler stepped once per optimizer step, or a callable taking the optimizer
    and returning one."""


def import_factory(spec: str, key: str = "task.factory") -> Callable[..., Any]:
    """Resolve ``module:function``; import failures become one-line ConfigErrors."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(key, f"cannot import module {module_name!r} ({one_line(exc)})") from None
    except SystemExit as exc:
        raise ConfigError(key, f"importing {module_name!r} called sys.exit({exc.code!r})") from None
    except Exception as exc:
        raise ConfigError(key, f"importing {module_name!r} raised {one_line(exc)}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(key, f"module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ConfigError(key, f"{spec!r} is not callable")
    return factory


def check_task(task: Any, origin: str = "task") -> Task:
    """Check the task contract and return it as a Task, its model made (a model factory is called
    here, after ``load_task`` seeded torch)."""
    missing = [a for a in ("model", "train_loader") if getattr(task, a, None) is None]
    loss_fn, forward_loss = getattr(task, "loss_fn", None), getattr(task, "forward_loss", None)
    if loss_fn is None and forward_loss is None:
        missing.append("loss_fn")
    if missing:
        raise ConfigError(
            origin,
            f"the task has no {', '.join(missing)}; a task needs model, train_loader, and loss_fn "
            "or forward_loss",
        )
    if loss_fn is not None and forward_loss is not None:
        raise ConfigError(origin, "the task gives both loss_fn and forward_loss; give one")
    for attr in ("loss_fn", "forward_loss", "count_items", "prepare"):
        value = getattr(task, attr, None)
        if value is not None and not callable(value):
            raise ConfigError(origin, f"task.{attr} must be callable, got {type(value).__name__}")
    for attr in ("train_loader", "val_loader"):
        value = getattr(task, attr, None)
        if value is not None and not hasattr(value, "__iter__"):
            raise ConfigError(origin, f"task.{attr} must be iterable, got {type(value).__name__}")
    splits = _splits(task, origin)
    metrics = _metrics(task, origin)
    train_metrics = _train_metrics(task, origin)
    return Task(
        model=_model(task.model, origin),
        train_loader=task.train_loader,
        loss_fn=loss_fn,
        forward_loss=forward_loss,
        val_loader=getattr(task, "val_loader", None),
        val_loaders=splits,
        metrics=metrics,
        train_metrics=train_metrics,
        count_items=getattr(task, "count_items", None),
        prepare=getattr(task, "prepare", None),
        optimizer=getattr(task, "optimizer", None),
        scheduler=getattr(task, "scheduler", None),
    )


METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
"""A metric's name: a word that every sink takes as it is (a Prometheus label value, a TensorBoard tag,
an ECS field)."""
METRIC_NAME_RULE = "a letter or '_', then up to 63 letters, digits or '_'"
"""``METRIC_NAME`` in words, for the messages that refuse a name."""


_EVAL_TAGS = frozenset({"loss"})
"""Names an evaluation metric cannot take: the ``eval.epoch`` loss's (``eval/loss``, ``eval.loss``)."""
_TRAIN_TAGS = frozenset(
    {
        "batch_loss",
        "batch_raw_loss",
        "batch_loss_scale",
        "step_loss",
        "lr",
        "grad_norm",
        "grad_scale",
        "epoch_loss",
    }
)
"""Names a training metric cannot take: the values traintel itself writes under ``train/``."""


def check_metric_name(name: Any, where: str, origin: str, taken: frozenset[str] = frozenset()) -> None:
    """A ConfigError (at ``origin``) unless ``name`` is a ``METRIC_NAME`` not in ``taken``."""
    if not (isinstance(name, str) and METRIC_NAME.fullmatch(name)):
        raise ConfigError(
            origin,
            f"{where}: the name {name!r} must be {METRIC_NAME_RULE}",
        )
    if name in taken:
        raise ConfigError(
            origin, f"{where}: the name {name!r} is traintel's own; names taken: {', '.join(sorted(taken))}"
        )


def _train_metrics(task: Any, origin: str) -> dict[str, Callable[[Any], Any]]:
    """The task's training metrics by name, each a callable of the step output."""
    given = getattr(task, "train_metrics", None)
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise ConfigError(
            origin, f"task.train_metrics must be a mapping of names to functions, got {type(given).__name__}"
        )
    for name, fn in given.items():
        check_metric_name(name, "task.train_metrics", origin, _TRAIN_TAGS)
        if not callable(fn):
            raise ConfigError(
                origin,
                f"task.train_metrics[{name!r}] must be a function of the step output, "
                f"got {type(fn).__name__}",
            )
    return dict(given)


def _metrics(task: Any, origin: str) -> dict[str, Any]:
    """The task's evaluation metrics by name, each an Ignite or torchmetrics ``Metric``."""
    from traintel.engine.metrics import metric_kind

    given = getattr(task, "metrics", None)
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise ConfigError(
            origin, f"task.metrics must be a mapping of names to metrics, got {type(given).__name__}"
        )
    for name, metric in given.items():
        check_metric_name(name, "task.metrics", origin, _EVAL_TAGS)
        try:
            metric_kind(metric)
        except TypeError as exc:
            raise ConfigError(origin, f"task.metrics[{name!r}] {exc}") from None
    return dict(given)


def _splits(task: Any, origin: str) -> dict[str, Iterable[Any]]:
    """The task's validation loaders by split name: ``val_loaders``, or ``val_loader`` as ``val``
    (not both); each name a short word (it is a label in every sink) and each loader iterable."""
    one, named = getattr(task, "val_loader", None), getattr(task, "val_loaders", None)
    if one is not None and named is not None:
        raise ConfigError(origin, "the task gives both val_loader and val_loaders; give one")
    if named is None:
        return {} if one is None else {"val": one}
    if not isinstance(named, Mapping):
        raise ConfigError(
            origin, f"task.val_loaders must be a mapping of names to loaders, got {type(named).__name__}"
        )
    for name, loader in named.items():
        if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name)):
            raise ConfigError(
                origin,
                f"task.val_loaders: the split name {name!r} must be 1-64 letters, digits, '_', '.' or '-'",
            )
        if not hasattr(loader, "__iter__"):
            raise ConfigError(
                origin, f"task.val_loaders[{name!r}] must be iterable, got {type(loader).__name__}"
            )
    return dict(named)


def _model(model: Any, origin: str) -> torch.nn.Module:
    """``task.model``, or what the model factory it is returns; anything else is a ConfigError."""
    import torch

    if isinstance(model, torch.nn.Module):
        return model
    if not callable(model):
        raise ConfigError(
            origin,
            f"task.model must be a torch.nn.Module or a zero-argument callable returning one, got "
            f"{type(model).__name__}",
        )
    try:
        made = model()
    except ConfigError:
        raise
    except SystemExit as exc:
        raise ConfigError(origin, f"task.model() called sys.exit({exc.code!r})") from None
    except Exception as exc:
        raise ConfigError(origin, f"task.model() raised {one_line(exc)}") from None
    if not isinstance(made, torch.nn.Module):
        raise ConfigError(origin, f"task.model() must return a torch.nn.Module, got {type(made).__name__}")
    return made


def make_task(factory: str, params: Mapping[str, Any]) -> Task:
    """Call ``factory(**params)`` and check the result; failures are ConfigErrors."""
    fn = import_factory(factory)
    try:
        inspect.signature(fn).bind(**params)
    except TypeError as exc:
        raise ConfigError("task.params", f"{factory} does not accept these parameters: {exc}") from None
    except ValueError:
        pass  # no signature to check (a builtin); the call below reports
    try:
        task = fn(**params)
    except ConfigError:
        raise
    except SystemExit as exc:  # user code's sys.exit is its failure, not the process's exit status
        raise ConfigError("task.factory", f"{factory} called sys.exit({exc.code!r})") from None
    except Exception as exc:
        raise ConfigError("task.factory", f"{factory} raised {one_line(exc)}") from None
    return check_task(task, origin="task.factory")
