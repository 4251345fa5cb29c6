"""Metrics beyond the loss reach every sink as the same value: a classifier's evaluation metrics
(Ignite's accuracy, a torchmetrics MAE), its training metrics (``Task.train_metrics``) and values
logged with ``Run.log`` are equal in the JSON lines, the diagnostic file, a real HTTP scrape of the
exporter and TensorBoard's event files (at float32), and equal to an independent computation."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchmetrics
from ignite.engine import Events
from ignite.metrics import Accuracy
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.runs import quiet_config
from tests.helpers.servers import http_get, wait_until
from traintel.engine.outputs import StepOutput
from traintel.records import MetricRecord
from traintel.run.api import build
from traintel.schema import validate_line
from traintel.sinks.memory import MemorySink
from traintel.task import Task

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

CLASSES = 3


def _classes(sizes: list[int], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, 4, generator=g)
        out.append((x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()))
    return out


def _classifier() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(4, CLASSES)


class ProbabilityMAE(torchmetrics.MeanAbsoluteError):
    """torchmetrics' MAE between the predicted class probabilities and the one-hot targets."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        one_hot = torch.nn.functional.one_hot(target, CLASSES).to(preds.dtype)
        super().update(preds.softmax(dim=1), one_hot)


def train_accuracy(out: StepOutput) -> torch.Tensor:
    """The share of the step's items whose class the model predicted right, on the device."""
    right = [(logits.argmax(dim=1) == target).sum() for logits, target in out.outputs]
    return torch.stack(right).sum() / sum(out.counts)


def largest_share(out: StepOutput) -> torch.Tensor:
    """The largest s_b of the window: a training metric from the step's losses."""
    return torch.stack(list(out.losses)).max()


TRAIN = [6, 6, 5, 6, 4, 6, 3]
VAL = [5, 7, 3]
K = 2
EPOCHS = 3


def _plain_run() -> tuple[list[dict[str, float]], list[float], list[float], list[float]]:
    """The same training in a plain loop: each step's training metrics, and after each epoch the
    validation accuracy, probability MAE and the weight norm."""
    model = _classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    data, val = _classes(TRAIN, 0), _classes(VAL, 1)
    steps: list[dict[str, float]] = []
    accuracy, mae, norms = [], [], []
    for _ in range(EPOCHS):
        for start in range(0, len(data), K):
            window = data[start : start + K]
            total = sum(len(y) for _, y in window)
            right, shares = 0, []
            for x, y in window:
                logits = model(x)
                share = torch.nn.functional.cross_entropy(logits, y) * (len(y) / total)
                share.backward()
                right += int((logits.argmax(dim=1) == y).sum())
                shares.append(float(share.detach()))
            steps.append({"accuracy": float(torch.tensor(right) / total), "largest_share": max(shares)})
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            logits = torch.cat([model(x) for x, _ in val])
            target = torch.cat([y for _, y in val])
        accuracy.append(int((logits.argmax(dim=1) == target).sum()) / len(target))
        one_hot = torch.nn.functional.one_hot(target, CLASSES).float()
        mae.append(float((logits.softmax(dim=1) - one_hot).abs().mean()))
        norms.append(float(torch.linalg.vector_norm(model.weight.detach())))
    return steps, accuracy, mae, norms


def _scrape(url: str) -> dict[tuple[str, str, str], float]:
    """The exporter's metric samples by (name, its name label, its split label)."""
    text = http_get(url).decode()
    return {
        (s.name, s.labels.get("name", ""), s.labels.get("split", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_every_metric_is_the_same_value_in_every_sink_and_the_plain_loop_s(tmp_path: Path) -> None:
    task = Task(
        model=_classifier(),
        loss_fn=torch.nn.functional.cross_entropy,
        train_loader=_classes(TRAIN, 0),
        val_loader=_classes(VAL, 1),
        metrics={"accuracy": Accuracy(), "prob_mae": ProbabilityMAE()},
        train_metrics={"accuracy": train_accuracy, "largest_share": largest_share},
    )
    cfg = quiet_config(
        tmp_path, accumulation_steps=K, max_epochs=EPOCHS, optimizer={"name": "sgd", "lr": 0.5}
    )
    cfg["sinks"]["json"] = {"enabled": True}
    cfg["sinks"]["diagnostic"] = {"enabled": True}
    cfg["sinks"]["prometheus"] = {"enabled": True, "host": "127.0.0.1", "port": 0}
    cfg["sinks"]["extra"] = [{"name": "tensorboard", "params": {"log_dir": str(tmp_path / "tb")}}]
    stdout = io.BytesIO()
    memory = MemorySink()
    run = build(cfg, task, sinks=[memory], json_stream=stdout)
    logged: list[MetricRecord] = []
    run.trainer.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda _: logged.append(run.log({"weight_norm": torch.linalg.vector_norm(run.model.weight)})),
    )
    scrapes: list[dict[tuple[str, str, str], float]] = []
    url = run.prometheus.url if run.prometheus is not None else None
    assert url is not None

    def scrape_at_the_end(_: Any) -> None:  # the run's last values, once every sink has them
        def final() -> dict[tuple[str, str, str], float]:
            found = _scrape(url)
            done = found.get(("traintel_optimizer_step", "", "")) == EPOCHS * 4
            return found if done and ("traintel_user_metric", "weight_norm", "") in found else {}

        scrapes.append(wait_until(final, "the exporter never showed the last step and the logged value"))

    run.trainer.add_event_handler(Events.COMPLETED, scrape_at_the_end)
    end = run.run()
    assert end.status == "completed"

    # the records: training metrics per step, evaluation metrics per epoch, one logged value per epoch
    steps = memory.of("train.step")
    evals = memory.of("eval.epoch")
    users = memory.of("metric")
    assert users == logged
    assert [(r.epoch, r.step) for r in users] == [(1, 4), (2, 8), (3, 12)]  # type: ignore[attr-defined]

    # equal to the plain loop: exactly for the counts, to float32 rounding for the rest
    want_steps, want_accuracy, want_mae, want_norms = _plain_run()
    got_steps = [dict(r.metrics) for r in steps]  # type: ignore[attr-defined]
    assert [s["accuracy"] for s in got_steps] == [s["accuracy"] for s in want_steps]
    assert [s["largest_share"] for s in got_steps] == pytest.approx(
        [s["largest_share"] for s in want_steps], rel=1e-6
    )
    assert [r.metrics["accuracy"] for r in evals] == want_accuracy  # type: ignore[attr-defined]
    assert [r.metrics["prob_mae"] for r in evals] == pytest.approx(want_mae, rel=1e-6)  # type: ignore[attr-defined]
    assert [r.metrics["weight_norm"] for r in users] == pytest.approx(want_norms, rel=1e-6)  # type: ignore[attr-defined]
    assert 0 < want_accuracy[0] < 1 and len({s["accuracy"] for s in want_steps}) > 2

    # the JSON lines and the diagnostic file: the same floats, valid lines
    def metrics_of(lines: list[dict[str, Any]]) -> dict[str, list[Any]]:
        return {
            event: [line["metrics"] for line in lines if line["event"] == event]
            for event in ("train.step", "eval.epoch", "metric")
        }

    out_lines = [json.loads(line) for line in stdout.getvalue().splitlines()]
    diag_lines = [
        json.loads(line) for line in (tmp_path / "run" / "diagnostic.jsonl").read_text().splitlines()
    ]
    expected = {
        "train.step": got_steps,
        "eval.epoch": [dict(r.metrics) for r in evals],  # type: ignore[attr-defined]
        "metric": [dict(r.metrics) for r in users],  # type: ignore[attr-defined]
    }
    assert metrics_of(out_lines) == metrics_of(diag_lines) == expected
    for line in out_lines + diag_lines:
        validate_line(line)

    # a real scrape: the newest of each, exactly
    (scraped,) = scrapes
    last_step, last_eval, last_user = steps[-1], evals[-1], users[-1]
    assert {key: value for key, value in scraped.items() if key[0].endswith("_metric")} == {
        ("traintel_train_metric", "accuracy", ""): last_step.metrics["accuracy"],  # type: ignore[attr-defined]
        ("traintel_train_metric", "largest_share", ""): last_step.metrics["largest_share"],  # type: ignore[attr-defined]
        ("traintel_eval_metric", "accuracy", "val"): last_eval.metrics["accuracy"],  # type: ignore[attr-defined]
        ("traintel_eval_metric", "prob_mae", "val"): last_eval.metrics["prob_mae"],  # type: ignore[attr-defined]
        ("traintel_user_metric", "weight_norm", ""): last_user.metrics["weight_norm"],  # type: ignore[attr-defined]
    }

    _check_tensorboard(tmp_path / "tb", steps, evals, users)


def _check_tensorboard(log_dir: Path, steps: list[Any], evals: list[Any], users: list[Any]) -> None:
    """TensorBoard's event files hold every metric value at its step, as float32."""
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()

    def scalars(tag: str) -> list[tuple[int, np.float32]]:
        return [(e.step, np.float32(e.value)) for e in acc.Scalars(tag)]

    def records(rows: list[Any], name: str) -> list[tuple[int, np.float32]]:
        return [(r.step, np.float32(r.metrics[name])) for r in rows]

    assert scalars("train/accuracy") == records(steps, "accuracy")
    assert scalars("train/largest_share") == records(steps, "largest_share")
    assert scalars("eval/accuracy") == records(evals, "accuracy")
    assert scalars("eval/prob_mae") == records(evals, "prob_mae")
    assert scalars("user/weight_norm") == records(users, "weight_norm")


def _copy_task(**changes: Any) -> Task:
    task = Task(
        model=_classifier(),
        loss_fn=torch.nn.functional.cross_entropy,
        train_loader=_classes([4, 4], 0),
        val_loader=_classes([3], 1),
    )
    return dataclasses.replace(task, **changes)


def test_a_nonfinite_metric_is_null_and_named_in_nonfinite(tmp_path: Path) -> None:
    """A training metric that is NaN on a step, and a logged infinity, keep their keys: null in the
    JSON lines, named ``metrics.<name>`` in ``nonfinite``, the lines valid."""
    task = _copy_task(
        train_metrics={"ratio": lambda out: torch.tensor(float("nan")) if out.step == 1 else out.losses[0]}
    )
    cfg = quiet_config(tmp_path, max_epochs=1, accumulation_steps=1)
    cfg["sinks"]["json"] = {"enabled": True}
    stdout = io.BytesIO()
    run = build(cfg, task, json_stream=stdout)
    run.trainer.add_event_handler(Events.COMPLETED, lambda _: run.log({"gain": math.inf, "kept": 2}))
    run.run()
    lines = [json.loads(line) for line in stdout.getvalue().splitlines()]
    steps = [line for line in lines if line["event"] == "train.step"]
    assert steps[0]["metrics"] == {"ratio": None} and steps[0]["nonfinite"] == {"metrics.ratio": "nan"}
    assert isinstance(steps[1]["metrics"]["ratio"], float) and "nonfinite" not in steps[1]
    (logged,) = [line for line in lines if line["event"] == "metric"]
    assert (logged["metrics"], logged["nonfinite"]) == ({"gain": None, "kept": 2.0}, {"metrics.gain": "inf"})
    for line in lines:
        validate_line(line)


def test_the_console_view_shows_metrics_as_a_dict() -> None:
    from traintel.sinks.json.sink import JsonSink
    from traintel.testing import eval_record, metric_record

    sink = JsonSink(console=True)
    plain = [
        re.sub(rb"\x1b\[[0-9;]*m", b"", sink.render(r)).decode()
        for r in (metric_record(), eval_record(metrics={"acc": 0.5}))
    ]
    assert (
        plain[0]
        .rstrip()
        .endswith("metric                         epoch=1 step=1 metrics={'val_bleu': 31.25}")
    )
    assert plain[1].rstrip().endswith("split=val metrics={'acc': 0.5}")
