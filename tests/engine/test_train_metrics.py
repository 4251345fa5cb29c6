"""Training metrics (``Task.train_metrics``) and ``Run.log``: what each may be, and how a bad one is
reported: one line naming it, at start when it can be known then, never silence."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.children import child_env, run_child
from tests.helpers.paths import ROOT
from tests.helpers.runs import quiet_config
from tests.helpers.tasks import make_batches, make_model
from traintel.engine.outputs import StepOutput
from traintel.errors import ConfigError
from traintel.run.api import build
from traintel.sinks.memory import MemorySink
from traintel.task import Task


def _task(**changes: Any) -> Task:
    task = Task(
        model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches([4, 4, 2])
    )
    for key, value in changes.items():
        setattr(task, key, value)
    return task


def _first_loss(out: StepOutput) -> torch.Tensor:
    return out.losses[0]


def test_a_bad_training_metric_is_one_line_at_start(tmp_path: Path) -> None:
    def error(train_metrics: Any) -> str:
        with pytest.raises(ConfigError) as caught:
            build(quiet_config(tmp_path), _task(train_metrics=train_metrics))
        return str(caught.value)

    assert error({"top-1": _first_loss}) == (
        "task: task.train_metrics: the name 'top-1' must be a letter or '_', then up to 63 letters, digits or '_'"
    )
    assert error({"lr": _first_loss}) == (
        "task: task.train_metrics: the name 'lr' is traintel's own; names taken: batch_loss, batch_loss_scale, "
        "batch_raw_loss, epoch_loss, grad_norm, grad_scale, lr, step_loss"
    )
    assert (
        error({"mae": 0.5})
        == "task: task.train_metrics['mae'] must be a function of the step output, got float"
    )
    assert (
        error([_first_loss]) == "task: task.train_metrics must be a mapping of names to functions, got list"
    )


def test_an_evaluation_metric_may_not_be_named_loss(tmp_path: Path) -> None:
    from ignite.metrics import MeanAbsoluteError

    task = _task(val_loader=make_batches([3], seed=1), metrics={"loss": MeanAbsoluteError()})
    with pytest.raises(ConfigError) as caught:
        build(quiet_config(tmp_path), task)
    assert str(caught.value) == "task: task.metrics: the name 'loss' is traintel's own; names taken: loss"


@pytest.mark.parametrize(
    ("value", "got"),
    [
        (lambda out: torch.stack(list(out.losses)), "a tensor of shape (2,)"),
        (lambda out: None, "None"),
        (lambda out: True, "a bool"),
        (lambda out: "0.5", "a str"),
    ],
)
def test_a_training_metric_that_is_not_one_number_fails_the_run_naming_it(
    tmp_path: Path, value: Any, got: str
) -> None:
    memory = MemorySink()
    run = build(
        quiet_config(tmp_path, accumulation_steps=2), _task(train_metrics={"spread": value}), sinks=[memory]
    )
    with pytest.raises(TypeError) as caught:
        run.run()
    message = f"train metric 'spread' returned {got}; it must return a one-element tensor"
    assert str(caught.value) == message
    (end,) = memory.of("run.end")
    assert (end.status, end.reason) == ("failed", f"TypeError: {message}")  # type: ignore[attr-defined]


def test_a_python_number_and_a_one_element_tensor_are_both_values(tmp_path: Path) -> None:
    memory = MemorySink()
    task = _task(train_metrics={"two": lambda out: 2, "first": lambda out: out.losses[0].reshape(1, 1)})
    build(quiet_config(tmp_path, accumulation_steps=2), task, sinks=[memory]).run()
    steps = memory.of("train.step")
    assert [dict(r.metrics) for r in steps] == [  # type: ignore[attr-defined]
        {"two": 2.0, "first": b.loss}  # type: ignore[attr-defined]
        for b in memory.of("train.batch")
        if b.batch in (1, 3)  # type: ignore[attr-defined]
    ]


def test_run_log_checks_what_it_is_given_and_makes_no_record_of_a_bad_call(tmp_path: Path) -> None:
    from ignite.engine import Events

    memory = MemorySink()
    run = build(quiet_config(tmp_path, accumulation_steps=1), _task(), sinks=[memory])
    with pytest.raises(
        RuntimeError, match=r"^Run.log works while the run runs: after run.start and before run.end$"
    ):
        run.log({"early": 1.0})
    failures: list[str] = []

    def bad_calls(_: Any) -> None:
        calls: list[tuple[Any, Any]] = [
            ({"top-1": 1.0}, None), ({"ok": "1.0"}, None), ({"ok": torch.ones(2)}, None), ({"ok": True}, None),
            ({}, None), ({"ok": 1.0}, -1), ({"ok": 1.0}, 1.5),
        ]  # fmt: skip
        for values, step in calls:
            try:
                run.log(values, step=step)
            except (TypeError, ValueError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
        run.log({"ok": torch.tensor([0.25]), "n": 3})
        run.log({"ok": 0.5}, step=100)

    run.trainer.add_event_handler(Events.EPOCH_COMPLETED, bad_calls)
    run.run()
    assert failures == [
        "ValueError: Run.log: the name 'top-1' must be a letter or '_', then up to 63 letters, digits or '_'",
        "TypeError: Run.log: 'ok' is a str; a value is a number or a one-element tensor",
        "TypeError: Run.log: 'ok' is a Tensor of shape (2,); a value is a number or a one-element tensor",
        "TypeError: Run.log: 'ok' is a bool; a value is a number or a one-element tensor",
        "TypeError: Run.log takes a non-empty mapping of names to numbers, got {}",
        "ValueError: Run.log: step must be an integer >= 0, got -1",
        "ValueError: Run.log: step must be an integer >= 0, got 1.5",
    ]
    logged = memory.of("metric")
    assert [(r.epoch, r.step, dict(r.metrics)) for r in logged] == [  # type: ignore[attr-defined]
        (1, 3, {"ok": 0.25, "n": 3.0}), (1, 100, {"ok": 0.5}),
    ]  # fmt: skip
    with pytest.raises(RuntimeError, match=r"^Run.log works while the run runs"):
        run.log({"late": 1.0})


USER_CODE = textwrap.dedent(
    """\
    from traintel.tasks.forecast import make_task as base


    def clashing(**params):
        task = base(**params)
        task.train_metrics = {"grad_norm": lambda out: out.losses[0]}
        return task
    """
)


def test_the_built_in_task_s_metrics_and_a_clashing_name_from_the_command_line(tmp_path: Path) -> None:
    """``task.params.metrics=true`` adds ``mae`` to the built-in task's steps and evaluations; a task
    factory's training metric named like traintel's own is exit 2 with one line, before training."""
    (tmp_path / "user_code.py").write_text(USER_CODE)
    base = [sys.executable, "-m", "traintel", "train", "--config", str(ROOT / "configs" / "default.yaml"),
            "--set", "sinks.prometheus.enabled=false", "--set", "trainer.max_epochs=1"]  # fmt: skip
    env = child_env(tmp_path, {"OMP_NUM_THREADS": "1"})
    ok = run_child(
        [*base, "--set", f"run.dir={tmp_path / 'a'}", "--set", "task.params.metrics=true"], tmp_path, env
    )
    assert ok.returncode == 0, ok.stderr
    lines = [json.loads(line) for line in ok.stdout.splitlines()]
    steps = [line for line in lines if line["event"] == "train.step"]
    (evaluation,) = [line for line in lines if line["event"] == "eval.epoch"]
    assert len(steps) == 11 and all(list(s["metrics"]) == ["mae"] and s["metrics"]["mae"] > 0 for s in steps)
    assert list(evaluation["metrics"]) == ["mae"] and 0 < evaluation["metrics"]["mae"] < 2
    bad = run_child(
        [*base, "--set", f"run.dir={tmp_path / 'b'}", "--set", "task.factory=user_code:clashing"],
        tmp_path,
        env,
    )
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == (
        "traintel: error: task.factory: task.train_metrics: the name 'grad_norm' is traintel's own; names taken: "
        "batch_loss, batch_loss_scale, batch_raw_loss, epoch_loss, grad_norm, grad_scale, lr, step_loss\n"
    )
    assert not (tmp_path / "b").exists()
