"""Task factories for ``torchrun ... -m traintel train`` in the distributed tests (on PYTHONPATH)."""

from __future__ import annotations

import os
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
