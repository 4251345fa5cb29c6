"""Every record carries ``attempt`` (schema 1.2.0): 0 for a run's first attempt, n for its n-th
resumption from a checkpoint, right after ``world_size``; ``run.start`` adds ``resumed_from_step``
and ``items_total``, and the Prometheus items counter continues from the latter at ``run.start``.

A run's attempt is ``Run.attempt`` (set from the checkpoint before the handlers and sinks are
built); ``_Resumed`` pins it so that every record-building path is seen carrying it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client.core import Metric

from tests.helpers.runs import quiet_config
from tests.helpers.tasks import make_batches, make_model
from traintel.records import RECORD_TYPES, Record, RunStartRecord, SinkErrorRecord
from traintel.run import resume
from traintel.run.api import build
from traintel.schema import parse_line, validate_line
from traintel.sinks import LineRenderer, MemorySink
from traintel.sinks.prometheus.sink import RecordCollector
from traintel.task import Task
from traintel.testing import T0, make_record, step_record


def _start(**overrides: Any) -> RunStartRecord:
    fields: dict[str, Any] = {
        "run_id": "r1", "time": T0, "name": "demo", "run_dir": "runs/r1", "device": "cpu", "config": {},
        "metrics_url": None, "optimizer": "torch.optim.sgd.SGD",
    }  # fmt: skip
    return RunStartRecord(**{**fields, **overrides})


def test_attempt_defaults_to_0_and_run_start_to_a_fresh_start() -> None:
    records = [
        make_record(e)
        for e in ("train.batch", "train.step", "train.epoch", "eval.epoch", "metric", "checkpoint", "run.end")
    ]
    start = _start()
    records += [start, SinkErrorRecord(run_id="r1", time=T0, sink="s", error="e")]
    assert sorted(r.event for r in records) == sorted(cls.event for cls in RECORD_TYPES)
    assert [r.attempt for r in records] == [0] * 9
    assert (start.resumed_from_step, start.items_total) == (None, 0)
    assert make_record("train.step", attempt=3).attempt == 3


def test_run_start_of_a_resumed_attempt_renders_and_validates() -> None:
    record = _start(attempt=2, resumed_from_step=120, items_total=1440)
    fields = record.fields()
    assert list(fields)[2:5] == ["rank", "world_size", "attempt"]
    assert list(fields)[-4:] == ["resumed_from_step", "items_total", "optimizer", "scheduler"]
    line = LineRenderer()(None, record.level, LineRenderer.event_dict(record))
    assert line.endswith(
        b'"schema_version":"1.5.0","rank":0,"world_size":1,"attempt":2,"name":"demo","run_dir":"runs/r1",'
        b'"device":"cpu","config":{},"metrics_url":null,"backend":null,"strategy":null,"restart_count":0,'
        b'"resumed_from_step":120,"items_total":1440,"optimizer":"torch.optim.sgd.SGD","scheduler":null}\n'
    )
    validate_line(parse_line(line))
    fresh = LineRenderer()(None, "info", LineRenderer.event_dict(_start()))
    assert b'"world_size":1,"attempt":0,"name":"demo"' in fresh
    assert b'"resumed_from_step":null,"items_total":0,"optimizer"' in fresh
    validate_line(parse_line(fresh))


# ----------------------------------------------------------------------------- Prometheus


def _items(collector: RecordCollector) -> float | None:
    families: list[Metric] = [f for f in collector.collect() if f.name == "traintel_items"]
    return families[0].samples[0].value if families else None


def test_the_items_counter_continues_from_the_checkpoint_at_run_start() -> None:
    collector = RecordCollector()
    assert _items(collector) is None
    collector.update_many([_start(attempt=1, resumed_from_step=10, items_total=1200)])
    assert _items(collector) == 1200.0
    collector.update_many([step_record(attempt=1, step=11, items=12, items_total=1212)])
    assert _items(collector) == 1212.0


def test_a_fresh_run_start_counts_zero_items() -> None:
    collector = RecordCollector()
    collector.update_many([_start()])
    assert _items(collector) == 0.0


# ----------------------------------------------------------------------------- a whole run


class _FailsOnSteps(MemorySink):
    def emit(self, record: Record) -> None:
        if record.event == "train.step":
            raise OSError("remote store unavailable")
        super().emit(record)


def test_every_record_of_a_resumed_run_carries_its_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch, step, epoch, eval, run.start, run.end and sink.error records (in memory, on stdout and
    in the diagnostic file) all say attempt 2."""
    cfg = quiet_config(tmp_path, accumulation_steps=2, max_epochs=2)
    cfg["sinks"]["json"] = {"enabled": True}
    cfg["sinks"]["diagnostic"] = {"enabled": True}
    task = Task(
        model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches([4] * 4),
        val_loader=make_batches([3, 3], seed=1),
    )  # fmt: skip
    memory = MemorySink()
    stream = io.BytesIO()
    # the attempt is decided before the run is planned: pinned here to the third
    monkeypatch.setattr(resume, "decide", lambda *_a, **_k: resume.Resumption("resumed-run", 2, None))
    run = build(cfg, task, sinks=[_FailsOnSteps("flaky"), memory], json_stream=stream)
    assert run.run().status == "completed"
    events = {r.event for r in memory.records}
    assert events == {
        "run.start",
        "train.batch",
        "train.step",
        "train.epoch",
        "eval.epoch",
        "run.end",
        "sink.error",
    }
    assert {r.attempt for r in memory.records} == {2}
    lines = [
        *stream.getvalue().splitlines(),
        *(tmp_path / "run" / "diagnostic.jsonl").read_bytes().splitlines(),
    ]
    rows = [parse_line(line) for line in lines]
    for row in rows:
        validate_line(row)
    records = [row for row in rows if "run_id" in row]
    assert {row["event"] for row in records} == events
    assert {row["attempt"] for row in records} == {2}
