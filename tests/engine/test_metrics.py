"""Evaluation metrics: Ignite and torchmetrics ``Metric``s in ``Task.metrics``, computed on each
evaluation pass and carried by the one ``eval.epoch`` record to every sink, equal to an independent
computation over the validation set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torchmetrics
from ignite.metrics import Accuracy, MeanAbsoluteError
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.runs import quiet_config
from traintel.errors import ConfigError
from traintel.run.api import build
from traintel.schema import validate_line
from traintel.sinks.memory import MemorySink
from traintel.task import Task


def _classes(sizes: list[int], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        out.append((x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()))  # three classes
    return out


def _classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3).double()


def test_ignite_and_torchmetrics_metrics_reach_every_sink_equal_to_an_independent_pass(
    tmp_path: Path,
) -> None:
    val = _classes([5, 7, 3], seed=1)
    task = Task(
        model=_classifier(),
        loss_fn=torch.nn.functional.cross_entropy,
        train_loader=_classes([6, 6, 6, 6], seed=0),
        val_loader=val,
        metrics={
            "accuracy": Accuracy(),
            "tm_accuracy": torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro"),
        },
    )
    cfg = quiet_config(tmp_path, accumulation_steps=2, max_epochs=2)
    cfg["sinks"]["diagnostic"]["enabled"] = True
    cfg["sinks"]["prometheus"] = {"enabled": True, "port": 0}
    memory = MemorySink()
    models: list[dict[str, torch.Tensor]] = []
    run = build(cfg, task, sinks=[memory])
    from ignite.engine import Events

    run.trainer.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda e: models.append({k: v.clone() for k, v in run.model.state_dict().items()}),
    )
    run.run()

    evals = memory.of("eval.epoch")
    got = [dict(r.metrics) for r in evals]  # type: ignore[attr-defined]
    want = []
    for state in models:
        model = _classifier()
        model.load_state_dict(state)
        with torch.no_grad():
            right = sum(int((model(x).argmax(dim=1) == y).sum()) for x, y in val)
        want.append(right / sum(len(y) for _, y in val))
    assert got == [{"accuracy": w, "tm_accuracy": pytest.approx(w, rel=1e-6)} for w in want]
    assert 0 < want[0] < 1

    diag = [json.loads(line) for line in (tmp_path / "run" / "diagnostic.jsonl").read_text().splitlines()]
    diag_evals = [d for d in diag if d["event"] == "eval.epoch"]
    assert [d["metrics"] for d in diag_evals] == got
    for line in diag_evals:
        validate_line(line)
    families = text_string_to_metric_families(generate_latest(run.prometheus.registry).decode())
    (family,) = [f for f in families if f.name == "traintel_eval_metric"]
    assert {(s.labels["name"], s.labels["split"]): s.value for s in family.samples} == {
        ("accuracy", "val"): got[-1]["accuracy"], ("tm_accuracy", "val"): got[-1]["tm_accuracy"],
    }  # fmt: skip


def test_torchmetrics_and_ignite_mean_absolute_error_on_a_regression_task(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    train = [(torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64)) for n in (4, 4, 2)]  # fmt: skip
    val = [(torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64)) for n in (3, 5)]  # fmt: skip
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    task = Task(
        model=model,
        loss_fn=torch.nn.functional.mse_loss,
        train_loader=train,
        val_loader=val,
        metrics={"mae": torchmetrics.MeanAbsoluteError(), "ignite_mae": MeanAbsoluteError()},
    )
    memory = MemorySink()
    build(quiet_config(tmp_path, accumulation_steps=2), task, sinks=[memory]).run()
    (record,) = memory.of("eval.epoch")
    with torch.no_grad():
        errors = torch.cat([(model(x) - y).abs().flatten() for x, y in val])
    want = float(errors.sum() / errors.numel())
    # both keep their sums in float32, whatever the model's dtype
    assert record.metrics["ignite_mae"] == pytest.approx(want, rel=1e-6)  # type: ignore[attr-defined]
    assert record.metrics["mae"] == pytest.approx(want, rel=1e-6)  # type: ignore[attr-defined]


def test_what_a_metric_cannot_be_is_one_line(tmp_path: Path) -> None:
    def error(metrics: Any) -> str:
        task = Task(model=_classifier(), loss_fn=torch.nn.functional.cross_entropy,
                    train_loader=_classes([2], 0), val_loader=_classes([2], 1), metrics=metrics)  # fmt: skip
        with pytest.raises(ConfigError) as caught:
            build(quiet_config(tmp_path), task)
        return str(caught.value)

    assert error({"acc": lambda o, t: 1.0}) == (
        "task: task.metrics['acc'] must be an ignite.metrics.Metric or a torchmetrics.Metric, got function"
    )
    assert error({"top-1": Accuracy()}) == (
        "task: task.metrics: the name 'top-1' must be a letter or '_', then up to 63 letters, digits or '_'"
    )
    assert error([Accuracy()]) == "task: task.metrics must be a mapping of names to metrics, got list"


def test_score_reads_the_value_every_sink_shows_and_drives_ignite_s_early_stopping(tmp_path: Path) -> None:
    from ignite.engine import Events
    from ignite.handlers import EarlyStopping

    import traintel

    task = Task(
        model=_classifier(),
        loss_fn=torch.nn.functional.cross_entropy,
        train_loader=_classes([6, 6], seed=0),
        val_loader=_classes([5, 7], seed=1),
        metrics={"accuracy": Accuracy()},
    )
    cfg = quiet_config(tmp_path, accumulation_steps=1, max_epochs=5, optimizer={"name": "sgd", "lr": 1e-12})
    memory = MemorySink()
    run = build(cfg, task, sinks=[memory])
    accuracy, loss = traintel.score("eval.accuracy"), traintel.score("eval.loss")
    with pytest.raises(RuntimeError) as caught:
        accuracy(run.trainer)
    assert str(caught.value) == (
        "no 'val' evaluation yet to score 'eval.accuracy' (score is called with the trainer, after one)"
    )
    scores: list[tuple[float, float]] = []
    run.trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: scores.append((accuracy(e), loss(e))))
    run.trainer.add_event_handler(
        Events.EPOCH_COMPLETED, EarlyStopping(patience=1, score_function=accuracy, trainer=run.trainer)
    )
    end = run.run()
    # a rate of 1e-12 changes no prediction: epoch 2's accuracy is no better, and patience 1 stops there
    assert (end.status, end.reason, end.epoch) == ("completed", "stopped by EarlyStopping (patience 1)", 2)
    evals = memory.of("eval.epoch")
    assert scores == [(r.metrics["accuracy"], -r.loss) for r in evals]  # type: ignore[attr-defined]
    with pytest.raises(KeyError) as missing:
        traintel.score("eval.f1")(run.trainer)
    assert missing.value.args[0] == "'eval.f1': the 'val' evaluation has no metric 'f1' (it has accuracy)"
    with pytest.raises(ValueError, match=r"^score names 'eval.loss' or 'eval.<metric>', got 'accuracy'$"):
        traintel.score("accuracy")
