"""No device-to-host conversion outside emission: counted on CPU, enforced on CUDA when present."""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import make_batches, make_model, quiet_config
from traintel.api import build
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


@pytest.mark.parametrize(("every", "emissions"), [(1, 12), (2, 6), (5, 2), (13, 0)])
def test_one_transfer_per_emission_and_one_float_per_epoch_mean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every: int, emissions: int
) -> None:
    task = Task(
        model=make_model(),
        loss_fn=torch.nn.functional.mse_loss,
        train_loader=make_batches([4] * 7),
        val_loader=make_batches([5, 5], seed=1),
    )
    cfg = quiet_config(tmp_path, accumulation_steps=3, max_epochs=4)
    cfg["telemetry"]["every"] = every
    mem = MemorySink()
    run = build(cfg, task, sinks=[mem])
    counts = _counting(monkeypatch)
    run.run()
    monkeypatch.undo()
    # one .tolist() per emitted step (all its batch losses, step loss and grad norm at once),
    # one float() per train.epoch loss and one per eval.epoch loss; nothing else
    assert dict(counts) == {k: v for k, v in {"tolist": emissions, "__float__": 8}.items() if v}
    assert len(mem.of("train.step")) == emissions
    assert len(mem.of("train.epoch")) == len(mem.of("eval.epoch")) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_update_step_never_synchronizes(tmp_path: Path) -> None:
    device = torch.device("cuda")
    batches = [(x.to(device), y.to(device)) for x, y in make_batches([4] * 7)]
    cfg = quiet_config(tmp_path, accumulation_steps=3, max_epochs=2, grad_clip_norm=1.0)
    cfg["trainer"]["device"] = "cuda"
    cfg["telemetry"]["every"] = 2
    mem = MemorySink()
    run = build(
        cfg, Task(model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=batches), sinks=[mem]
    )
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
