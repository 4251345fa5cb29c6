"""The run's lifecycle belongs to ``Run.run()``: users' end-of-run handlers run before ``run.end``,
the exporter lingers only after it, and every way a run ends gets exactly one ``run.end``."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.lines import strict_object
from tests.helpers.runs import quiet_config
from tests.helpers.tasks import loss_failing_at, make_batches, make_model
from traintel.engine.evaluator import eval_state
from traintel.run.api import build
from traintel.sinks.memory import MemorySink
from traintel.task import Task


def _task(loss_fn: Any = torch.nn.functional.mse_loss) -> Task:
    return Task(model=make_model(), loss_fn=loss_fn, train_loader=make_batches([4] * 4))


def _events(stream: io.BytesIO) -> list[dict[str, Any]]:
    return [strict_object(line) for line in stream.getvalue().splitlines()]


def test_a_completed_handler_runs_before_run_end_and_before_the_linger(tmp_path: Path) -> None:
    cfg = quiet_config(tmp_path, accumulation_steps=2, max_epochs=2)
    cfg["sinks"]["json"] = {"enabled": True}
    cfg["sinks"]["prometheus"] = {"enabled": True, "port": 0, "linger_seconds": 1.5}
    stream = io.BytesIO()
    memory = MemorySink()
    run = build(cfg, _task(), sinks=[memory], json_stream=stream)
    seen: list[tuple[str, float]] = []

    def on_completed(engine: Engine) -> None:
        seen.append(("completed", time.time()))
        logging.getLogger("user").warning("checkpoint saved at epoch %d", engine.state.epoch)

    run.trainer.add_event_handler(Events.COMPLETED, on_completed)
    end = run.run()
    returned = time.time()

    assert end.status == "completed" and end.reason == "max_epochs"
    (when,) = [t for name, t in seen if name == "completed"]
    assert when <= end.time  # the handler ran before run.end was made
    assert returned - end.time >= 1.5  # the linger came after run.end, not before the handler
    rows = _events(stream)
    tail = [(r["event"], r.get("logger")) for r in rows[-2:]]
    assert tail == [("checkpoint saved at epoch 2", "user"), ("run.end", None)]
    assert [r.event for r in memory.records].count("run.end") == 1


def test_terminate_and_exception_handlers_run_before_run_end(tmp_path: Path) -> None:
    cfg = quiet_config(tmp_path, accumulation_steps=2, max_epochs=3)
    cfg["telemetry"]["max_delay_seconds"] = 0  # each step's records at once: a fixed order of lines
    cfg["sinks"]["json"] = {"enabled": True}
    stream = io.BytesIO()
    run = build(cfg, _task(), json_stream=stream)
    run.trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda e: e.terminate())
    run.trainer.add_event_handler(Events.TERMINATE, lambda _: logging.getLogger("user").warning("stopping"))
    end = run.run()
    assert (end.status, end.reason, end.epoch, end.step) == (
        "completed",
        "stopped by a handler",
        2,
        3,
    )
    assert [(r["event"], r.get("step")) for r in _events(stream)[-3:]] == [
        ("train.step", 3),
        ("stopping", None),
        ("run.end", 3),
    ]


def test_early_stopping_on_a_worsening_validation_loss_completes_the_run(tmp_path: Path) -> None:
    """Ignite's EarlyStopping, attached as Ignite's docs attach it, ends the run after the third
    evaluation (the second without improvement): ``run.end`` says completed, naming it, and
    ``traintel_run_success`` is 1. Training pulls the weight from 0 towards 1 (targets +1), which
    takes it away from the validation targets (-1): the validation loss grows every epoch."""
    ones = torch.ones(4, 1, dtype=torch.float64)
    model = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    task = Task(
        model=model,
        loss_fn=torch.nn.functional.mse_loss,
        train_loader=[(ones, ones), (ones, ones)],
        val_loader=[(ones, -ones)],
    )
    cfg = quiet_config(tmp_path, max_epochs=10, accumulation_steps=1)
    cfg["sinks"]["prometheus"] = {"enabled": True, "port": 0}
    memory = MemorySink()
    run = build(cfg, task, sinks=[memory])
    assert run.evaluator is not None and run.prometheus is not None

    def score(evaluator: Engine) -> float:
        acc = eval_state(evaluator).eval
        return -float(acc.loss_sum) / acc.items

    run.evaluator.add_event_handler(
        Events.COMPLETED, EarlyStopping(patience=2, score_function=score, trainer=run.trainer)
    )
    end = run.run()

    assert (end.status, end.reason, end.epoch, end.step) == (
        "completed",
        "stopped by EarlyStopping (patience 2)",
        3,
        6,
    )
    losses = [r.loss for r in memory.of("eval.epoch")]  # type: ignore[attr-defined]
    assert len(losses) == 3 and losses[0] < losses[1] < losses[2]
    families = text_string_to_metric_families(generate_latest(run.prometheus.registry).decode())
    success = [s.value for f in families for s in f.samples if s.name == "traintel_run_success"]
    assert success == [1.0]


def test_an_exception_handler_runs_before_run_end_and_the_run_fails(tmp_path: Path) -> None:
    cfg = quiet_config(tmp_path, accumulation_steps=2)
    cfg["sinks"]["json"] = {"enabled": True}
    stream = io.BytesIO()
    memory = MemorySink()
    run = build(cfg, _task(loss_failing_at(3, "diverged")), sinks=[memory], json_stream=stream)

    def on_exception(_engine: Engine, exc: BaseException) -> None:
        logging.getLogger("user").warning("saw %s", exc)
        raise exc

    run.trainer.add_event_handler(Events.EXCEPTION_RAISED, on_exception)
    with pytest.raises(RuntimeError, match="diverged"):
        run.run()
    end = memory.of("run.end")
    assert [(e.status, e.reason, e.step) for e in end] == [("failed", "RuntimeError: diverged", 1)]  # type: ignore[attr-defined]
    assert [r["event"] for r in _events(stream)[-3:]] == ["saw diverged", "training failed", "run.end"]


def test_an_exception_handler_that_terminates_ends_the_run_as_completed(tmp_path: Path) -> None:
    """As in Ignite, a handler that does not re-raise has handled the exception: here it stops the run."""
    cfg = quiet_config(tmp_path, accumulation_steps=2, max_epochs=2)
    memory = MemorySink()
    run = build(cfg, _task(loss_failing_at(3, "diverged")), sinks=[memory])
    run.trainer.add_event_handler(Events.EXCEPTION_RAISED, lambda engine, _exc: engine.terminate())
    end = run.run()
    assert (end.status, end.reason, end.epoch, end.step) == (
        "completed",
        "stopped by a handler",
        1,
        1,
    )
    assert [r.event for r in memory.records].count("run.end") == 1


def test_a_run_runs_once(tmp_path: Path) -> None:
    run = build(quiet_config(tmp_path), _task())
    assert run.run().status == "completed"
    with pytest.raises(RuntimeError, match="a Run runs once"):
        run.run()
