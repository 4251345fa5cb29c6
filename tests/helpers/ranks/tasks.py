"""Task factories for ``torchrun ... -m traintel train`` in the distributed tests (on PYTHONPATH)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from traintel.task import Task
from traintel.tasks.forecast import make_task


def fails_on_rank(rank: int = 1, call: int = 7, **params: Any) -> Task:
    """The built-in task, except that on ``rank`` the loss raises at its ``call``-th micro-batch."""
    task = make_task(**params)
    calls = 0
    here = int(os.environ.get("RANK", "0"))

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if here == rank and calls == call:
            msg = f"loss exploded on rank {here}"
            raise RuntimeError(msg)
        return torch.nn.functional.mse_loss(out, target)

    task.loss_fn = loss_fn
    return task


def slow(seconds: float = 0.05, **params: Any) -> Task:
    """The built-in task with a pause in every loss, so a signal lands mid-run."""
    import time

    task = make_task(**params)

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        time.sleep(seconds)
        return torch.nn.functional.mse_loss(out, target)

    task.loss_fn = loss_fn
    return task


class Indexed(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Sample i is ``(i, 2i)`` as one-feature tensors; each read appends ``i`` to ``record`` (when given),
    so a test sees which samples a rank trained, in order."""

    def __init__(self, size: int, record: str | None = None) -> None:
        self.size = size
        self.record = record

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.record is not None:
            with open(self.record, "a", encoding="utf-8") as f:
                f.write(f"{i}\n")
        return torch.tensor([float(i)]), torch.tensor([2.0 * i])


def split(samples: int = 100, train: int = 50, batch_size: int = 10, record: str | None = None) -> Task:
    """A linear model on ``Indexed``: the first ``train`` samples train (a ``SubsetRandomSampler``),
    the rest validate (another); rank r's training reads go to ``<record>.rank<r>``."""
    from torch.utils.data import DataLoader, SubsetRandomSampler

    here = os.environ.get("RANK", "0")
    trained = Indexed(samples, None if record is None else f"{record}.rank{here}")
    return Task(
        model=torch.nn.Linear(1, 1),
        loss_fn=torch.nn.functional.mse_loss,
        train_loader=DataLoader(trained, batch_size=batch_size, sampler=SubsetRandomSampler(range(train))),
        val_loader=DataLoader(
            Indexed(samples), batch_size=batch_size, sampler=SubsetRandomSampler(range(train, samples))
        ),
    )


def sampled(sampler: str = "weighted", loader: str = "train") -> Task:
    """The ``split`` task with one loader's sampler replaced: ``weighted`` (a WeightedRandomSampler) or
    ``own`` (a Sampler class of the task's own)."""
    from torch.utils.data import DataLoader, Sampler, WeightedRandomSampler

    class TaskSampler(Sampler[int]):
        def __iter__(self) -> Iterator[int]:
            return iter(range(0, 100, 2))

        def __len__(self) -> int:
            return 50

    task = split()
    chosen = WeightedRandomSampler([1.0] * 100, 50) if sampler == "weighted" else TaskSampler()
    replaced = DataLoader(Indexed(100), batch_size=10, sampler=chosen)
    if loader == "train":
        task.train_loader = replaced
    else:
        task.val_loader = replaced
    return task
