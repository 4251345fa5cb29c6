"""No device-to-host conversion outside emission: counted on CPU, enforced on CUDA when present."""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.runs import quiet_config
from tests.helpers.tasks import make_batches, make_model
from traintel.engine.outputs import StepOutput
from traintel.run.api import build
from traintel.sinks.memory import MemorySink
from traintel.task import Task

CONVERSIONS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


def _counting(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for name in CONVERSIONS:
        original = getattr(torch.Tensor, name)

        def wrapper(
            self: torch.Tensor, *args: Any, _name: str = name, _orig: Callable[..., Any] = original
        ) -> Any:
            counts[_name] += 1
            return _orig(self, *args)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return counts


# 7 micro-batches of 4 items, k=3: 3 optimizer steps per epoch, 4 epochs, 12 steps
@pytest.mark.parametrize(
    ("every", "max_delay", "emissions", "transfers"),
    [
        (1, 0.0, 12, 12),  # every emitted step delivered at once: one transfer each
        (2, 0.0, 6, 6),
        (5, 0.0, 2, 2),
        (13, 0.0, 0, 0),
        # the first emitted step goes at once, later ones wait for the end of their epoch
        (1, 60.0, 12, 5),  # steps 1 | 2, 3 | 4-6 | 7-9 | 10-12
        (2, 60.0, 6, 4),  # steps 2 | 4, 6 | 8 | 10, 12
        (5, 60.0, 2, 2),  # steps 5 | 10
    ],
)
def test_one_transfer_per_delivery_and_one_float_per_epoch_mean(  # noqa: PLR0917 - parametrized
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    every: int,
    max_delay: float,
    emissions: int,
    transfers: int,
) -> None:
    task = Task(
        model=make_model(),
        loss_fn=torch.nn.functional.mse_loss,
        train_loader=make_batches([4] * 7),
        val_loader=make_batches([5, 5], seed=1),
    )
    cfg = quiet_config(tmp_path, accumulation_steps=3, max_epochs=4)
    cfg["telemetry"] = {"every": every, "max_delay_seconds": max_delay}
    mem = MemorySink()
    run = build(cfg, task, sinks=[mem])
    counts = _counting(monkeypatch)
    run.run()
    monkeypatch.undo()
    # one .tolist() per delivery (every waiting step's batch losses, step loss and grad norm at
    # once), one float() per train.epoch loss and one per eval.epoch loss; nothing else
    assert dict(counts) == {k: v for k, v in {"tolist": transfers, "__float__": 8}.items() if v}
    steps = list(range(every, 13, every))
    assert len(steps) == emissions
    assert [r.step for r in mem.of("train.step")] == steps  # type: ignore[attr-defined]
    assert len(mem.of("train.batch")) == sum((3, 3, 1)[(s - 1) % 3] for s in steps)  # windows of 3, 3, 1
    assert len(mem.of("train.epoch")) == len(mem.of("eval.epoch")) == 4


def _mae(out: StepOutput) -> torch.Tensor:
    """Mean absolute error of the step's outputs, on the device."""
    errors = [(output - target).abs().sum() for output, target in out.outputs]
    return torch.stack(errors).sum() / sum(t.numel() for _, t in out.outputs)


def _largest_share(out: StepOutput) -> torch.Tensor:
    return torch.stack(list(out.losses)).max()


@pytest.mark.parametrize(("every", "max_delay", "transfers"), [(1, 0.0, 12), (1, 60.0, 5), (5, 60.0, 2)])
def test_training_metrics_travel_in_the_same_transfer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every: int, max_delay: float, transfers: int
) -> None:
    """Two training metrics add no conversion: their values go in each delivery's one ``tolist``; they
    are computed for the emitted steps only."""
    calls: list[int] = []

    def counted_mae(out: StepOutput) -> torch.Tensor:
        calls.append(out.step)
        return _mae(out)

    task = Task(
        model=make_model(),
        loss_fn=torch.nn.functional.mse_loss,
        train_loader=make_batches([4] * 7),
        val_loader=make_batches([5, 5], seed=1),
        train_metrics={"mae": counted_mae, "largest_share": _largest_share},
    )
    cfg = quiet_config(tmp_path, accumulation_steps=3, max_epochs=4)
    cfg["telemetry"] = {"every": every, "max_delay_seconds": max_delay}
    mem = MemorySink()
    run = build(cfg, task, sinks=[mem])
    counts = _counting(monkeypatch)
    run.run()
    monkeypatch.undo()
    assert dict(counts) == {"tolist": transfers, "__float__": 8}
    steps = mem.of("train.step")
    assert [r.step for r in steps] == list(range(every, 13, every))  # type: ignore[attr-defined]
    assert calls == [r.step for r in steps]  # type: ignore[attr-defined]  # computed for emitted steps only
    for record in steps:
        assert list(record.metrics) == ["mae", "largest_share"]  # type: ignore[attr-defined]
        assert 0.0 < record.metrics["mae"] < 10.0  # type: ignore[attr-defined]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_update_step_never_synchronizes(tmp_path: Path) -> None:
    device = torch.device("cuda")
    batches = [(x.to(device), y.to(device)) for x, y in make_batches([4] * 7)]
    cfg = quiet_config(tmp_path, accumulation_steps=3, max_epochs=2, grad_clip_norm=1.0)
    cfg["trainer"]["device"] = "cuda"
    cfg["telemetry"]["every"] = 2
    mem = MemorySink()
    task = Task(
        model=make_model(),
        loss_fn=torch.nn.functional.mse_loss,
        train_loader=batches,
        train_metrics={"mae": _mae},
    )
    run = build(cfg, task, sinks=[mem])
    step = run.trainer._process_function

    def strict_step(engine: Any, window: Any) -> Any:
        torch.cuda.set_sync_debug_mode("error")  # any synchronizing call inside the step raises
        try:
            return step(engine, window)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    run.trainer._process_function = strict_step
    end = run.run()
    assert end.status == "completed", end.reason
    assert [r.step for r in mem.of("train.step")] == [2, 4, 6]  # type: ignore[attr-defined]
