"""The task contract: what a ``task.factory`` returns, and how it is loaded and checked."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from traintel.errors import ConfigError, one_line


@dataclass
class Task:
    """What a factory returns (any object with these attributes will do).

    ``loss_fn(output, target)`` must return the mean loss over the batch's items.
    Batches are ``(inputs, targets)`` unless ``prepare(batch, device)`` is given;
    ``count_items(batch)`` returns n_b (default: the batch size).
    """

    model: Any
    loss_fn: Callable[[Any, Any], Any]
    train_loader: Iterable[Any]
    val_loader: Iterable[Any] | None = None
    count_items: Callable[[Any], int] | None = None
    prepare: Callable[[Any, Any], tuple[Any, Any]] | None = None


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
    """Check the task contract and return it as a Task."""
    import torch

    missing = [a for a in ("model", "loss_fn", "train_loader") if getattr(task, a, None) is None]
    if missing:
        raise ConfigError(
            origin, f"the task has no {', '.join(missing)}; a task needs model, loss_fn, train_loader"
        )
    if not isinstance(task.model, torch.nn.Module):
        raise ConfigError(origin, f"task.model must be a torch.nn.Module, got {type(task.model).__name__}")
    for attr in ("loss_fn", "count_items", "prepare"):
        value = getattr(task, attr, None)
        if value is not None and not callable(value):
            raise ConfigError(origin, f"task.{attr} must be callable, got {type(value).__name__}")
    for attr in ("train_loader", "val_loader"):
        value = getattr(task, attr, None)
        if value is not None and not hasattr(value, "__iter__"):
            raise ConfigError(origin, f"task.{attr} must be iterable, got {type(value).__name__}")
    return Task(
        model=task.model,
        loss_fn=task.loss_fn,
        train_loader=task.train_loader,
        val_loader=getattr(task, "val_loader", None),
        count_items=getattr(task, "count_items", None),
        prepare=getattr(task, "prepare", None),
    )


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
