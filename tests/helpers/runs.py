"""Short in-process runs with only an in-memory sink."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.helpers.tasks import make_model
from traintel.sinks.memory import MemorySink
from traintel.task import Task


def quiet_config(tmp_path: Path, **trainer: Any) -> dict[str, Any]:
    """Only the in-memory sink: json, diagnostic and prometheus off."""
    return {
        "run": {"dir": str(tmp_path / "run"), "id": "test-run"},
        "trainer": {"device": "cpu", "max_epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}, **trainer},
        "telemetry": {"every": 1},
        "sinks": {
            "json": {"enabled": False},
            "diagnostic": {"enabled": False},
            "prometheus": {"enabled": False},
        },
    }


def train_in_memory(
    tmp_path: Path,
    batches: list[Any],
    *,
    model: torch.nn.Module | None = None,
    every: int = 1,
    attach: Callable[[Any], None] | None = None,
    **trainer: Any,
) -> tuple[MemorySink, Any]:
    """Train ``batches`` with only a MemorySink; ``attach(run)`` may add handlers before the run."""
    from traintel.run.api import build

    cfg = quiet_config(tmp_path, **trainer)
    cfg["telemetry"]["every"] = every
    sink = MemorySink()
    task = Task(model=model or make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=batches)
    run = build(cfg, task, sinks=[sink])
    if attach is not None:
        attach(run)
    run.run()
    return sink, run
