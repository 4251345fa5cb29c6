"""Shared fixtures: tiny float64 tasks and a helper that trains with an in-memory sink."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from traintel.schema import parse_line
from traintel.sinks.memory import MemorySink
from traintel.task import Task


def make_batches(
    sizes: list[int], features: int = 3, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches of the given sizes, float64, from a fixed linear-plus-noise problem."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, features, generator=g, dtype=torch.float64)
        y = x.sum(dim=1, keepdim=True) * 0.5 + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
        out.append((x, y))
    return out


def strict_object(line: str | bytes) -> dict[str, Any]:
    """One JSON line parsed strictly (``traintel.schema.parse_line``: no NaN/Infinity literals, no
    duplicate keys), which must be an object."""
    value = parse_line(line)
    assert isinstance(value, dict), line
    return value


def loss_failing_at(call: int, message: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """MSE that raises ``RuntimeError(message)`` at its ``call``-th use (a failure mid-run)."""
    calls = 0

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == call:
            raise RuntimeError(message)
        return torch.nn.functional.mse_loss(out, y)

    return loss_fn


def make_model(features: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(features, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()


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


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("TRAINTEL__"):
            monkeypatch.delenv(name)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any) -> None:
    """End the run with one line naming what was skipped and why (grouped by reason), so a machine
    without prometheus, promtool or a GPU never passes the real-server tests silently."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons: dict[str, int] = {}
    for report in skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    listed = "; ".join(f"{reason} ({count})" for reason, count in sorted(reasons.items()))
    terminalreporter.write_line(f"traintel: {len(skipped)} skipped: {listed}")
