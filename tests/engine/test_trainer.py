"""The trainer is a real Ignite Engine: stock Ignite handlers attach and work."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from ignite.contrib.handlers import ProgressBar
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver, EarlyStopping, TerminateOnNan, Timer

from tests.helpers.runs import quiet_config
from tests.helpers.tasks import make_batches, make_model
from traintel.run.api import Run, build
from traintel.sinks.memory import MemorySink
from traintel.task import Task


def _run(
    tmp_path: Path, *, val: bool = False, loss_fn=torch.nn.functional.mse_loss, **trainer
) -> tuple[Run, MemorySink]:  # type: ignore[no-untyped-def]
    sink = MemorySink()
    task = Task(
        model=make_model(),
        loss_fn=loss_fn,
        train_loader=make_batches([4] * 7),
        val_loader=make_batches([5, 5], seed=1) if val else None,
    )
    return build(quiet_config(tmp_path, accumulation_steps=3, **trainer), task, sinks=[sink]), sink


def test_checkpoint_saves_model_and_optimizer(tmp_path: Path) -> None:
    run, _ = _run(tmp_path, max_epochs=3)
    ckpt = Checkpoint(
        {"model": run.task.model, "optimizer": run.optimizer, "trainer": run.trainer},
        DiskSaver(str(tmp_path / "ckpt"), require_empty=False),
        n_saved=2,
    )
    run.trainer.add_event_handler(Events.EPOCH_COMPLETED, ckpt)
    run.run()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint_6.pt", "checkpoint_9.pt"]
    state = torch.load(tmp_path / "ckpt" / "checkpoint_9.pt", weights_only=True)
    assert (state["trainer"]["iteration"], state["trainer"]["epoch_length"]) == (9, 3)
    for name, value in run.task.model.state_dict().items():
        torch.testing.assert_close(state["model"][name], value)


def test_early_stopping_ends_the_run_as_completed(tmp_path: Path) -> None:
    run, sink = _run(tmp_path, val=True, max_epochs=6)
    assert run.evaluator is not None
    stopper = EarlyStopping(patience=1, score_function=lambda _: 1.0, trainer=run.trainer)
    run.evaluator.add_event_handler(Events.COMPLETED, stopper)
    end = run.run()
    assert (end.status, end.reason, end.epoch, end.step) == (
        "completed",
        "stopped by EarlyStopping (patience 1)",
        2,
        6,
    )
    assert [r.event for r in sink.records][-4:] == ["train.step", "train.epoch", "eval.epoch", "run.end"]
    assert len(sink.of("eval.epoch")) == 2


def test_terminate_on_nan_stops_after_the_step_that_produced_it(tmp_path: Path) -> None:
    calls = {"n": 0}

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = torch.nn.functional.mse_loss(out, y)
        return loss * math.nan if calls["n"] == 5 else loss  # micro-batch 5 is in window 2

    run, sink = _run(tmp_path, loss_fn=loss_fn, max_epochs=2)
    run.trainer.add_event_handler(Events.ITERATION_COMPLETED, TerminateOnNan())
    end = run.run()
    assert (end.status, end.reason, end.step) == ("completed", "stopped by a handler", 2)
    steps = sink.of("train.step")
    assert len(steps) == 2 and math.isnan(steps[1].loss)  # type: ignore[attr-defined]


def test_timer_and_progress_bar_attach(tmp_path: Path) -> None:
    run, _ = _run(tmp_path, max_epochs=2)
    timer = Timer(average=True)
    timer.attach(
        run.trainer,
        start=Events.STARTED,
        resume=Events.ITERATION_STARTED,
        pause=Events.ITERATION_COMPLETED,
        step=Events.ITERATION_COMPLETED,
    )
    ProgressBar(persist=False, disable=True).attach(run.trainer, output_transform=lambda x: {"loss": x})
    seen: list[int] = []
    run.trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.iteration))
    end = run.run()
    assert end.status == "completed"
    assert timer.step_count == 6 and timer.value() > 0
    assert seen == [1, 2, 3, 4, 5, 6]


def test_state_output_is_the_step_loss_tensor(tmp_path: Path) -> None:
    run, sink = _run(tmp_path, max_epochs=1)
    outputs: list[torch.Tensor] = []

    @run.trainer.on(Events.ITERATION_COMPLETED)
    def _keep(engine: Engine) -> None:
        outputs.append(engine.state.output)

    run.run()
    assert [float(o) for o in outputs] == [r.loss for r in sink.of("train.step")]  # type: ignore[attr-defined]
    assert all(o.dtype == torch.float64 and not o.requires_grad for o in outputs)
