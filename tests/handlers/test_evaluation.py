"""Evaluation cadence and named validation loaders: ``eval.every_steps`` and ``eval.every_epochs``,
one ``eval.epoch`` record per split carrying the step it was taken at, equal to an independent
computation; an evaluation after a step that a stop cuts is owed, and a resumed run evaluates it
first, drawing what it would have drawn, then trains on bit for bit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Events

from tests.helpers.runs import quiet_config
from tests.helpers.tasks import make_batches
from traintel.engine.events import TraintelEvents
from traintel.errors import ConfigError
from traintel.run.api import Run, build
from traintel.sinks.memory import MemorySink
from traintel.task import Task

SIZES = [4, 3, 5, 2, 4, 1, 3, 2]  # k=3: 3 steps an epoch


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Dropout(0.2), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).double()


class Noisy:
    """Validation batches with fresh noise on the inputs, drawn from torch's global generator as they
    are read (so an evaluation's values depend on the generators it starts from); ``on_pass(n)`` is
    called after the first batch of the n-th pass over them."""

    def __init__(self, batches: list[Any], on_pass: Callable[[int], None] = lambda n: None) -> None:
        self.batches, self.on_pass, self.passes = batches, on_pass, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        self.passes += 1
        for i, (x, y) in enumerate(self.batches):
            yield x + 0.01 * torch.randn(x.shape, dtype=x.dtype), y
            if i == 0:
                self.on_pass(self.passes)


def _task(on_pass: Callable[[int], None] = lambda n: None) -> Task:
    val = make_batches([3, 2], seed=1)
    return Task(
        model=_model(),
        loss_fn=torch.nn.functional.mse_loss,
        train_loader=make_batches(SIZES),
        val_loaders={"val": Noisy(val, on_pass), "test": make_batches([4], seed=2)},
    )


def _config(
    tmp_path: Path, *, every_steps: int | None, every_epochs: int | None, **trainer: Any
) -> dict[str, Any]:
    cfg = quiet_config(tmp_path, accumulation_steps=3, **{"max_epochs": 2, **trainer})
    cfg["eval"] = {"every_steps": every_steps, "every_epochs": every_epochs}
    return cfg


def _evals(sink: MemorySink) -> list[tuple[int, int, str, float]]:
    return [(r.epoch, r.step, r.split, r.loss) for r in sink.of("eval.epoch")]  # type: ignore[attr-defined]


def test_every_steps_evaluates_each_split_at_its_step_and_equals_an_independent_pass(tmp_path: Path) -> None:
    sink = MemorySink()
    run = build(_config(tmp_path, every_steps=2, every_epochs=None), _task(), sinks=[sink])
    models: dict[int, dict[str, torch.Tensor]] = {}  # the parameters at each step, to evaluate again
    rngs: dict[int, torch.Tensor] = {}

    def keep(engine: Any) -> None:
        models[engine.state.progress.run_steps] = {k: v.clone() for k, v in run.model.state_dict().items()}

    def keep_rng(engine: Any) -> None:  # the generator as the step leaves it (the optimizer draws nothing)
        rngs[engine.state.progress.run_steps + 1] = torch.get_rng_state()

    run.trainer.add_event_handler(Events.ITERATION_COMPLETED, keep)
    run.trainer.add_event_handler(TraintelEvents.OPTIMIZER_STEP_STARTED, keep_rng)
    run.run()
    got = _evals(sink)
    assert [(e, s, split) for e, s, split, _ in got] == [
        (1, 2, "val"), (1, 2, "test"), (2, 4, "val"), (2, 4, "test"), (2, 6, "val"), (2, 6, "test"),
    ]  # fmt: skip
    # step 6 is epoch 2's last: evaluated after its train.epoch record
    events = [r.event for r in sink.records]
    assert events.index("eval.epoch", events.index("train.epoch", events.index("train.epoch") + 1)) > 0
    assert [r.event for r in sink.records[-4:]] == ["train.epoch", "eval.epoch", "eval.epoch", "run.end"]

    val, test = make_batches([3, 2], seed=1), make_batches([4], seed=2)
    for _, step, split, loss in got:
        model = _model()
        model.load_state_dict(models[step])
        model.eval()
        if split == "val":
            torch.set_rng_state(rngs[step])
            batches = [(x + 0.01 * torch.randn(x.shape, dtype=x.dtype), y) for x, y in val]
        else:
            batches = test
        with torch.no_grad():
            total = sum(float(torch.nn.functional.mse_loss(model(x), y)) * len(y) for x, y in batches)
        assert loss == pytest.approx(total / sum(len(y) for _, y in batches), rel=1e-15, abs=0)


def test_every_epochs_evaluates_at_every_nth_epochs_end(tmp_path: Path) -> None:
    sink = MemorySink()
    build(_config(tmp_path, every_steps=None, every_epochs=2, max_epochs=5), _task(), sinks=[sink]).run()
    assert [(e, s, split) for e, s, split, _ in _evals(sink)] == [
        (2, 6, "val"), (2, 6, "test"), (4, 12, "val"), (4, 12, "test"),
    ]  # fmt: skip


def _resumable(tmp_path: Path, **trainer: Any) -> dict[str, Any]:
    cfg = _config(tmp_path, every_steps=2, every_epochs=None, **trainer)
    cfg["run"]["resume"] = "auto"
    cfg["checkpoint"] = {"every_steps": 1}
    return cfg


def test_an_evaluation_after_a_step_cut_by_a_stop_is_run_first_on_resume_and_all_goes_on_bit_for_bit(
    tmp_path: Path,
) -> None:
    whole = MemorySink()
    build(_resumable(tmp_path / "whole"), _task(), sinks=[whole]).run()

    first = MemorySink()
    holder: list[Run] = []

    def stop_in_second_pass(n: int) -> None:
        if n == 2:  # the evaluation after step 4: cut part-way through its first split
            holder[0].stop("SIGTERM")

    run = build(_resumable(tmp_path / "split"), _task(stop_in_second_pass), sinks=[first])
    holder.append(run)
    end = run.run()
    assert (end.status, end.reason, end.step) == ("terminated", "SIGTERM", 4)
    assert [(e, s, split) for e, s, split, _ in _evals(first)] == [(1, 2, "val"), (1, 2, "test")]

    rest = MemorySink()
    resumed = build(_resumable(tmp_path / "split"), _task(), sinks=[rest])
    assert resumed.resumed_from_step == 4
    assert resumed.run().status == "completed"
    assert _evals(first) + _evals(rest) == _evals(whole)
    steps = [r.loss for r in first.of("train.step") + rest.of("train.step")]  # type: ignore[attr-defined]
    assert steps == [r.loss for r in whole.of("train.step")]  # type: ignore[attr-defined]


def test_named_loaders_are_checked(tmp_path: Path) -> None:
    def error(**given: Any) -> str:
        task = Task(
            model=_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches(SIZES), **given
        )
        with pytest.raises(ConfigError) as caught:
            build(quiet_config(tmp_path), task)
        return str(caught.value)

    batches = make_batches([2])
    assert error(val_loader=batches, val_loaders={"a": batches}) == (
        "task: the task gives both val_loader and val_loaders; give one"
    )
    assert error(val_loaders={"a b": batches}) == (
        "task: task.val_loaders: the split name 'a b' must be 1-64 letters, digits, '_', '.' or '-'"
    )
    assert error(val_loaders={"a": 3}) == "task: task.val_loaders['a'] must be iterable, got int"
