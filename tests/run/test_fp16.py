"""``trainer.precision: fp16``: float16 autocast with a real ``torch.amp.GradScaler`` on CPU. The logged
losses never include the scaler's factor, a step it skips for overflow is reported skipped and left
out of the epoch's sums, and its state survives a resume; all against a plain loop with the same
scaler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Events

from tests.helpers.runs import quiet_config
from traintel.run.api import build
from traintel.sinks.memory import MemorySink
from traintel.task import Task

SIZES = [4, 3, 5, 2, 4, 1, 3, 2]
SCALER = {"init_scale": 2.0**17, "growth_interval": 2}
"""A first scale that overflows float16 gradients: the first steps are skipped while it falls, and
then it grows again every 2 steps."""


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g) * 3) for n in SIZES]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def plain_fp16(model: torch.nn.Module, epochs: int) -> dict[str, Any]:
    """The loop a user writes from torch's AMP recipe, windows of 3 micro-batches scaled by items."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=SCALER["init_scale"], growth_interval=SCALER["growth_interval"]
    )
    data = _batches()
    losses, scales, skipped, epoch_losses = [], [], [], []
    for _ in range(epochs):
        loss_sum, items = 0.0, 0
        for start in range(0, len(data), 3):
            window = data[start : start + 3]
            total = sum(len(y) for _, y in window)
            step, raws = 0.0, []
            for x, y in window:
                with torch.autocast("cpu", dtype=torch.float16):
                    raw = torch.nn.functional.mse_loss(model(x), y)
                share = raw * (len(y) / total)
                scaler.scale(share).backward()
                step += float(share.detach())
                raws.append(share.detach())
            before = scaler.get_scale()
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            losses.append(step)
            scales.append(before)
            skipped.append(scaler.get_scale() < before)
            if not skipped[-1]:
                loss_sum += float(sum(r.double() * total for r in raws))
                items += total
            opt.zero_grad(set_to_none=True)
        epoch_losses.append(loss_sum / items)
    return {"losses": losses, "scales": scales, "skipped": skipped, "epochs": epoch_losses, "scaler": scaler}


def _run(tmp_path: Path, epochs: int, *, resume: bool = False) -> tuple[MemorySink, list[Any], Any]:
    cfg = quiet_config(
        tmp_path, accumulation_steps=3, max_epochs=epochs, precision="fp16", grad_scaler=SCALER
    )
    if resume:
        cfg["run"]["resume"] = "auto"
        cfg["checkpoint"] = {"every_epochs": 1}
    sink = MemorySink()
    model = _model()
    run = build(
        cfg, Task(model=model, loss_fn=torch.nn.functional.mse_loss, train_loader=_batches()), sinks=[sink]
    )
    outputs: list[Any] = []
    run.trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.step_output))
    run.run()
    return sink, outputs, run


def test_fp16_logs_unscaled_losses_and_skips_overflowing_steps_as_a_plain_amp_loop(tmp_path: Path) -> None:
    sink, outputs, run = _run(tmp_path, 2)
    want = plain_fp16(theirs := _model(), 2)

    steps = sink.of("train.step")
    assert [r.loss for r in steps] == want["losses"]  # type: ignore[attr-defined]
    assert [o.grad_scale for o in outputs] == want["scales"]
    assert [r.skipped for r in steps] == want["skipped"]  # type: ignore[attr-defined]
    assert want["skipped"][:3] == [True, True, False]  # the overflow happened, and was seen as such
    assert not all(want["skipped"])
    assert max(r.loss for r in steps) < 100  # type: ignore[attr-defined]  # a scaled one would be ~1e6
    assert [r.loss for r in sink.of("train.epoch")] == want["epochs"]  # type: ignore[attr-defined]
    assert run.plan.engines.grad_scaler.state_dict() == want["scaler"].state_dict()
    for p, q in zip(run.model.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_scalers_state_is_checkpointed_and_resumed(tmp_path: Path) -> None:
    whole, _, _ = _run(tmp_path / "whole", 3, resume=True)
    first, _, _ = _run(tmp_path / "split", 2, resume=True)
    rest, outputs, run = _run(tmp_path / "split", 3, resume=True)
    assert run.resumed_from_step is not None
    split = [r.loss for r in first.of("train.step") + rest.of("train.step")]  # type: ignore[attr-defined]
    assert split == [r.loss for r in whole.of("train.step")]  # type: ignore[attr-defined]
    assert outputs[0].grad_scale != SCALER["init_scale"]  # went on from where it was, not from the start


@pytest.mark.parametrize("value", [{"init_scale": 0}, {"backoff_factor": 1}, {"growth_factor": 1}])
def test_grad_scaler_settings_are_checked(tmp_path: Path, value: dict[str, Any]) -> None:
    from traintel.config import validate
    from traintel.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        validate(quiet_config(tmp_path, precision="fp16", grad_scaler=value))
    key, number = next(iter(value.items()))
    bound = {
        "init_scale": "greater than 0",
        "backoff_factor": "less than 1",
        "growth_factor": "greater than 1",
    }[key]
    assert str(caught.value) == f"trainer.grad_scaler.{key}: input should be {bound} (got {number})"
