"""Schema 1.3.0: ``train.step`` carries ``grad_scale`` after ``skipped`` (the gradient scaler's factor
its backward ran with under ``trainer.precision: fp16``, null otherwise) and ``eval.epoch`` carries
``split`` after ``items_per_second`` (the validation loader's name, ``val`` for ``val_loader``).

Both are dataclass fields with defaults, so records built without them keep working; the
Prometheus exporter serves ``traintel_grad_scale`` only while the newest step record has one.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from ignite.engine import Events
from prometheus_client import CollectorRegistry, generate_latest

from tests.helpers.runs import quiet_config
from tests.helpers.tasks import make_batches, make_model
from traintel.records import EvalRecord, StepRecord, layout
from traintel.run.api import build
from traintel.schema import parse_line, validate_line, validate_lines
from traintel.sinks import JsonSink, LineRenderer, MemorySink
from traintel.sinks.prometheus.sink import RecordCollector
from traintel.task import Task
from traintel.testing import T0, eval_record, run_context, step_record

STEP_HEAD = (
    b'{"timestamp":"2025-11-24T16:00:01.250000Z","level":"info","event":"train.step",'
    b'"run_id":"r1","schema_version":"1.5.0","rank":0,"world_size":1,"attempt":0,'
    b'"epoch":1,"step":1,"items":12,"items_total":12,"window_size":3,"loss":0.6875,"lr":0.001,'
    b'"grad_norm":null,"skipped":false,'
)
EVAL_HEAD = (
    b'{"timestamp":"2025-11-24T16:00:02.250000Z","level":"info","event":"eval.epoch",'
    b'"run_id":"r1","schema_version":"1.5.0","rank":0,"world_size":1,"attempt":0,'
    b'"epoch":1,"step":1,"loss":0.625,"items":8,"batches":2,"duration_seconds":0.5,"items_per_second":16.0,'
)


def _line(record: StepRecord | EvalRecord) -> bytes:
    return LineRenderer()(None, record.level, LineRenderer.event_dict(record))


def test_the_new_fields_come_last_in_their_layouts() -> None:
    assert layout(StepRecord)[0] == (
        "rank", "world_size", "attempt", "epoch", "step", "items", "items_total", "window_size", "loss",
        "lr", "grad_norm", "skipped", "grad_scale", "metrics",
    )  # fmt: skip
    assert layout(EvalRecord)[0] == (
        "rank", "world_size", "attempt", "epoch", "step", "loss", "items", "batches", "duration_seconds",
        "items_per_second", "split", "metrics",
    )  # fmt: skip


def test_defaults_are_no_scaler_and_the_val_split() -> None:
    step = StepRecord(
        run_id="r1", time=T0, epoch=1, step=1, items=12, items_total=12, window_size=3, loss=0.5, lr=0.1,
        grad_norm=None, skipped=False,
    )  # fmt: skip
    evaluation = EvalRecord(
        run_id="r1", time=T0, epoch=1, step=1, loss=0.5, items=8, batches=2, duration_seconds=0.5,
        items_per_second=16.0,
    )  # fmt: skip
    assert (step.grad_scale, evaluation.split, dict(evaluation.metrics)) == (None, "val", {})
    assert list(step.fields())[-3:] == ["skipped", "grad_scale", "metrics"]
    assert list(evaluation.fields())[-3:] == ["items_per_second", "split", "metrics"]


def test_the_lines_are_exact_and_valid() -> None:
    lines = [
        _line(step_record()),
        _line(step_record(grad_scale=65536.0)),
        _line(eval_record()),
        _line(eval_record(split="test")),
        _line(eval_record(metrics={"accuracy": 0.75, "perplexity": 3.5})),
    ]
    assert lines == [
        STEP_HEAD + b'"grad_scale":null,"metrics":{}}\n',
        STEP_HEAD + b'"grad_scale":65536.0,"metrics":{}}\n',
        EVAL_HEAD + b'"split":"val","metrics":{}}\n',
        EVAL_HEAD + b'"split":"test","metrics":{}}\n',
        EVAL_HEAD + b'"split":"val","metrics":{"accuracy":0.75,"perplexity":3.5}}\n',
    ]
    assert validate_lines(lines) == 5


def test_the_ecs_profile_puts_them_under_the_namespace() -> None:
    out = io.BytesIO()
    sink = JsonSink(out, profile="ecs")
    sink.open(run_context(Path("unused")))
    sink.emit_many([step_record(grad_scale=1024.0), eval_record()])
    sink.close()
    step, evaluation = out.getvalue().splitlines()
    assert step.endswith(
        b'"traintel.grad_norm":null,"traintel.skipped":false,"traintel.grad_scale":1024.0,"traintel.metrics":{}}'
    )
    assert evaluation.endswith(
        b'"traintel.items_per_second":16.0,"traintel.split":"val","traintel.metrics":{}}'
    )
    assert validate_lines([step, evaluation], profile="ecs") == 2


def _exposition(collector: RecordCollector) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()


def test_the_exporter_serves_the_grad_scale_only_while_the_newest_step_has_one() -> None:
    collector = RecordCollector()
    collector.update_many([step_record()])
    assert "traintel_grad_scale" not in _exposition(collector)
    collector.update_many([step_record(step=2, grad_scale=32768.0)])
    assert (
        "# HELP traintel_grad_scale Gradient scaler's factor of the latest emitted step (fp16).\n"
        "# TYPE traintel_grad_scale gauge\n"
        "traintel_grad_scale 32768.0\n"
    ) in _exposition(collector)
    collector.update_many([step_record(step=3)])
    assert "traintel_grad_scale" not in _exposition(collector)


def _float32(sizes: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.float(), y.float()) for x, y in make_batches(sizes, seed=seed)]


def test_a_fp16_run_logs_the_scale_each_step_ran_with_and_its_split(tmp_path: Path) -> None:
    """The scale doubles after every step without overflow (growth_interval 1): 1024, 2048, ...; each
    step record holds the factor its own backward used, the value on the engine's step output."""
    cfg = quiet_config(
        tmp_path, accumulation_steps=2, max_epochs=2, precision="fp16",
        grad_scaler={"init_scale": 1024.0, "growth_interval": 1},
    )  # fmt: skip
    cfg["sinks"]["json"] = {"enabled": True}
    task = Task(
        model=make_model().float(), loss_fn=torch.nn.functional.mse_loss, train_loader=_float32([4, 3, 5, 2]),
        val_loader=_float32([3, 3], seed=1),
    )  # fmt: skip
    memory, stream = MemorySink(), io.BytesIO()
    run = build(cfg, task, sinks=[memory], json_stream=stream)
    outputs: list[float | None] = []
    run.trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.step_output.grad_scale)
    )
    assert run.run().status == "completed"

    steps = memory.of("train.step")
    assert [(r.step, r.skipped, r.grad_scale) for r in steps] == [  # type: ignore[attr-defined]
        (1, False, 1024.0), (2, False, 2048.0), (3, False, 4096.0), (4, False, 8192.0),
    ]  # fmt: skip
    assert outputs == [1024.0, 2048.0, 4096.0, 8192.0]
    assert [r.split for r in memory.of("eval.epoch")] == ["val", "val"]  # type: ignore[attr-defined]
    rows = [parse_line(line) for line in stream.getvalue().splitlines()]
    for row in rows:
        validate_line(row)
    assert [row["grad_scale"] for row in rows if row["event"] == "train.step"] == outputs
    assert [row["split"] for row in rows if row["event"] == "eval.epoch"] == ["val", "val"]


def test_a_run_without_a_scaler_logs_null(tmp_path: Path) -> None:
    cfg = quiet_config(tmp_path, accumulation_steps=2)
    task = Task(
        model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches([4, 3, 5])
    )
    memory = MemorySink()
    assert build(cfg, task, sinks=[memory]).run().status == "completed"
    assert [r.grad_scale for r in memory.of("train.step")] == [None, None]  # type: ignore[attr-defined]
