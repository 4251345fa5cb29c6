"""The JSON sink's structlog chain (user processors run on every record line), the diagnostic
file's lines (each record's public line plus its extras, rendered by the file itself), and routed
stdlib log lines."""

from __future__ import annotations

import io
import json
import logging
import math
import sys
from collections.abc import MutableMapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import structlog

from traintel.config import SinksConfig
from traintel.records import RunStartRecord
from traintel.run.assembly import build_sinks
from traintel.schema import validate_lines
from traintel.sinks import DiagnosticSink, FanOut, JsonSink
from traintel.sinks.json.logs import JsonLogHandler
from traintel.testing import T0, batch_record, end_record, run_context, step_record
from traintel.testing.records import checkpoint_record

BATCH_LINE = (
    b'{"timestamp":"2025-11-24T16:00:00.250000Z","level":"info","event":"train.batch",'
    b'"run_id":"r1","schema_version":"1.5.0","rank":0,"world_size":1,"attempt":0,'
    b'"epoch":1,"batch":2,"batches":10,"step":0,"items":4,'
    b'"raw_loss":0.75,"loss":0.25,"loss_scale":0.3333333333333333,"window_size":3'
)
"""``batch_record()``'s line without its closing brace."""
STEP_LINE = (
    b'{"timestamp":"2025-11-24T16:00:01.250000Z","level":"info","event":"train.step",'
    b'"run_id":"r1","schema_version":"1.5.0","rank":0,"world_size":1,"attempt":0,'
    b'"epoch":1,"step":1,"items":12,"items_total":12,'
    b'"window_size":3,"loss":0.6875,"lr":0.001,"grad_norm":null,"skipped":false,"grad_scale":null,"metrics":{}'
)
"""``step_record()``'s line without its closing brace."""


class _AddHost:
    """A user's processor: adds ``host`` and the method name it was called with."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, _logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        self.calls += 1
        event_dict["host"] = "node-7"
        event_dict["method"] = method
        return event_dict


def _json_lines(sink: JsonSink, *batches: list[Any]) -> list[bytes]:
    out = io.BytesIO()
    sink._stream = out  # the sink writes to this stream once opened
    sink.open(run_context(Path("unused")))
    for records in batches:
        sink.emit_many(records)
    sink.close()
    return out.getvalue().splitlines(keepends=True)


def test_a_processor_added_to_the_json_sink_runs_on_every_record_line() -> None:
    host = _AddHost()
    records = [batch_record(), batch_record(batch=3), step_record(), end_record(status="failed", reason="x")]
    lines = _json_lines(JsonSink(processors=[host]), records[:3], records[3:])
    assert host.calls == 4
    assert lines == [
        BATCH_LINE + b',"host":"node-7","method":"info"}\n',
        BATCH_LINE.replace(b'"batch":2', b'"batch":3') + b',"host":"node-7","method":"info"}\n',
        STEP_LINE + b',"host":"node-7","method":"info"}\n',
        b'{"timestamp":"2025-11-24T16:00:03.250000Z","level":"error","event":"run.end","run_id":"r1",'
        b'"schema_version":"1.5.0","rank":0,"world_size":1,"attempt":0,'
        b'"status":"failed","reason":"x","epoch":1,"step":1,"items_total":12,'
        b'"duration_seconds":3.0,"host":"node-7","method":"error"}\n',
    ]


def test_processors_run_before_the_ecs_layout_and_the_strict_renderer() -> None:
    def halve(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
        event_dict["half_loss"] = event_dict["loss"] / 2 if "loss" in event_dict else math.nan
        return event_dict

    def service(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
        event_dict["service.name"] = "trainer"  # an ECS name: kept as it is
        return event_dict

    sink = JsonSink(profile="ecs", processors=[halve, service])
    (line,) = _json_lines(sink, [batch_record(loss=math.inf)])
    assert line == (
        b'{"@timestamp":"2025-11-24T16:00:00.250000Z","log.level":"info","message":"train.batch",'
        b'"ecs.version":"8.11.0","event.dataset":"traintel.records","event.action":"train.batch",'
        b'"traintel.run_id":"r1","traintel.schema_version":"1.5.0","traintel.rank":0,"traintel.world_size":1,'
        b'"traintel.attempt":0,"traintel.epoch":1,"traintel.batch":2,"traintel.batches":10,"traintel.step":0,'
        b'"traintel.items":4,"traintel.raw_loss":0.75,"traintel.loss":null,'
        b'"traintel.loss_scale":0.3333333333333333,"traintel.window_size":3,'
        b'"traintel.half_loss":null,"service.name":"trainer","traintel.nonfinite":{"loss":"inf","half_loss":"inf"}}\n'
    )


def test_a_processor_can_drop_a_record_line() -> None:
    def no_batches(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
        if event_dict["event"] == "train.batch":
            raise structlog.DropEvent
        return event_dict

    lines = _json_lines(JsonSink(processors=[no_batches]), [batch_record(), step_record()])
    assert lines == [STEP_LINE + b"}\n"]


def test_the_diagnostic_file_renders_each_record_as_its_public_line_plus_its_extras(tmp_path: Path) -> None:
    out = io.BytesIO()
    json_sink, diagnostic = JsonSink(out), DiagnosticSink()
    fan = FanOut([json_sink, diagnostic])
    fan.open(run_context(tmp_path))
    diag = MappingProxyType({"scale_ok": True, "rss_bytes": 7})
    fan.emit_many([batch_record(diagnostics=diag), step_record()])
    fan.emit(end_record())
    fan.close()
    stdout = out.getvalue().splitlines(keepends=True)
    file = (tmp_path / "diagnostic.jsonl").read_bytes().splitlines(keepends=True)
    assert stdout[0] == BATCH_LINE + b"}\n"
    assert file[0] == BATCH_LINE + b',"scale_ok":true,"rss_bytes":7}\n'
    assert file[1:] == stdout[1:] and len(file) == 3


def test_non_finite_values_of_the_record_and_its_extras_are_named_in_one_nonfinite_last(
    tmp_path: Path,
) -> None:
    """Through the sinks a run builds: stdout names the record's non-finite values, the diagnostic
    file those and its extras' in one ``nonfinite``, last."""
    out = io.BytesIO()
    built = build_sinks(SinksConfig.model_validate({"prometheus": {"enabled": False}}), json_stream=out)
    built.fanout.open(run_context(tmp_path))
    diag = MappingProxyType({"observed_loss_scale": math.inf, "scale_ok": None})
    built.fanout.emit_many(
        [batch_record(raw_loss=math.nan, diagnostics=diag), batch_record(diagnostics=diag)]
    )
    built.fanout.close()
    head = BATCH_LINE.replace(b'"raw_loss":0.75', b'"raw_loss":null')
    assert out.getvalue() == head + b',"nonfinite":{"raw_loss":"nan"}}\n' + BATCH_LINE + b"}\n"
    assert (tmp_path / "diagnostic.jsonl").read_bytes() == (
        head + b',"observed_loss_scale":null,"scale_ok":null,'
        b'"nonfinite":{"raw_loss":"nan","observed_loss_scale":"inf"}}\n'
        + BATCH_LINE
        + b',"observed_loss_scale":null,"scale_ok":null,"nonfinite":{"observed_loss_scale":"inf"}}\n'
    )


def test_the_diagnostic_file_does_not_get_what_the_json_sinks_processors_add(tmp_path: Path) -> None:
    json_sink = JsonSink(io.BytesIO(), processors=[_AddHost()])
    diagnostic = DiagnosticSink()
    fan = FanOut([json_sink, diagnostic])
    fan.open(run_context(tmp_path))
    fan.emit_many([batch_record(diagnostics=MappingProxyType({"scale_ok": True}))])
    fan.close()
    assert (tmp_path / "diagnostic.jsonl").read_bytes() == BATCH_LINE + b',"scale_ok":true}\n'


def test_a_checkpoint_record_is_one_exact_valid_line_in_either_profile() -> None:
    """Schema 1.5.0's ``checkpoint`` record: its fields after the head in declaration order, a
    non-finite seconds value null and named in ``nonfinite``; each line valid in its profile."""
    records = [
        checkpoint_record(),
        checkpoint_record(rank=1, world_size=2, attempt=1, step=40, epoch=3, reason="best",
                          size_bytes=123_456_789, write_seconds=1.5, stall_seconds=0.0625, background=True),
        checkpoint_record(reason="signal", write_seconds=math.inf),
    ]  # fmt: skip
    lines = _json_lines(JsonSink(), records)
    head = (
        b'{"timestamp":"2025-11-24T16:00:03.000000Z","level":"info","event":"checkpoint","run_id":"r1",'
        b'"schema_version":"1.5.0",'
    )
    assert lines == [
        head + b'"rank":0,"world_size":1,"attempt":0,"step":1,"epoch":1,"reason":"every_steps",'
        b'"size_bytes":4096,"write_seconds":0.25,"stall_seconds":0.25,"background":false}\n',
        head + b'"rank":1,"world_size":2,"attempt":1,"step":40,"epoch":3,"reason":"best",'
        b'"size_bytes":123456789,"write_seconds":1.5,"stall_seconds":0.0625,"background":true}\n',
        head + b'"rank":0,"world_size":1,"attempt":0,"step":1,"epoch":1,"reason":"signal",'
        b'"size_bytes":4096,"write_seconds":null,"stall_seconds":0.25,"background":false,'
        b'"nonfinite":{"write_seconds":"inf"}}\n',
    ]
    assert validate_lines(lines) == 3
    ecs = _json_lines(JsonSink(profile="ecs"), records[:1])
    assert ecs == [
        b'{"@timestamp":"2025-11-24T16:00:03.000000Z","log.level":"info","message":"checkpoint",'
        b'"ecs.version":"8.11.0","event.dataset":"traintel.records","event.action":"checkpoint",'
        b'"traintel.run_id":"r1","traintel.schema_version":"1.5.0","traintel.rank":0,"traintel.world_size":1,'
        b'"traintel.attempt":0,"traintel.step":1,"traintel.epoch":1,"traintel.reason":"every_steps",'
        b'"traintel.size_bytes":4096,"traintel.write_seconds":0.25,"traintel.stall_seconds":0.25,'
        b'"traintel.background":false}\n'
    ]
    assert validate_lines(_json_lines(JsonSink(profile="ecs"), records), profile="ecs") == 3


def test_run_start_carries_the_strategy_right_after_the_backend() -> None:
    """Schema 1.5.0's ``strategy``: null in a single process, ``ddp`` or ``fsdp`` under torchrun."""
    common: dict[str, Any] = {
        "run_id": "r1", "time": T0, "name": "demo", "run_dir": "runs/r1", "device": "cpu", "config": {},
        "metrics_url": None, "optimizer": "torch.optim.sgd.SGD",
    }  # fmt: skip
    single = RunStartRecord(**common)
    sharded = RunStartRecord(**common, rank=1, world_size=2, backend="nccl", strategy="fsdp")
    lines = _json_lines(JsonSink(), [single, sharded])
    tail = (
        b'"restart_count":0,"resumed_from_step":null,"items_total":0,"optimizer":"torch.optim.sgd.SGD",'
        b'"scheduler":null}\n'
    )
    assert lines == [
        b'{"timestamp":"2025-11-24T16:00:00.250000Z","level":"info","event":"run.start","run_id":"r1",'
        b'"schema_version":"1.5.0","rank":0,"world_size":1,"attempt":0,"name":"demo","run_dir":"runs/r1",'
        b'"device":"cpu","config":{},"metrics_url":null,"backend":null,"strategy":null,' + tail,
        b'{"timestamp":"2025-11-24T16:00:00.250000Z","level":"info","event":"run.start","run_id":"r1",'
        b'"schema_version":"1.5.0","rank":1,"world_size":2,"attempt":0,"name":"demo","run_dir":"runs/r1",'
        b'"device":"cpu","config":{},"metrics_url":null,"backend":"nccl","strategy":"fsdp",' + tail,
    ]
    assert validate_lines(lines) == 2
    ecs = _json_lines(JsonSink(profile="ecs"), [single, sharded])
    assert [json.loads(line)["traintel.strategy"] for line in ecs] == [None, "fsdp"]
    assert validate_lines(ecs, profile="ecs") == 2


def _log_lines(profile: str) -> list[bytes]:
    out = io.BytesIO()
    sink = JsonSink(out, profile=profile, processors=[_AddHost()])
    sink.open(run_context(Path("unused")))
    handler = JsonLogHandler(sink)
    warning = logging.LogRecord("py.warnings", logging.WARNING, "f.py", 3, "slow %s\n", ("loader",), None)
    warning.created = 1_764_000_000.5
    handler.emit(warning)
    try:
        raise ValueError("boom")
    except ValueError:
        failure = logging.LogRecord(
            "traintel", logging.ERROR, "f.py", 3, "training failed", (), sys.exc_info()
        )
    failure.created = 1_764_000_001.0
    handler.emit(failure)
    sink.close()
    return out.getvalue().splitlines(keepends=True)


@pytest.mark.parametrize("profile", ["default", "ecs"])
def test_stdlib_log_lines_are_strict_json_in_the_sinks_profile(profile: str) -> None:
    warning, failure = _log_lines(profile)
    if profile == "default":
        assert warning == (
            b'{"timestamp":"2025-11-24T16:00:00.500000Z","level":"warning","event":"slow loader",'
            b'"logger":"py.warnings"}\n'
        )
        head = b'{"timestamp":"2025-11-24T16:00:01.000000Z","level":"error","event":"training failed",'
        head += b'"logger":"traintel","exception":[{"exc_type":"ValueError","exc_value":"boom",'
    else:
        assert warning == (
            b'{"@timestamp":"2025-11-24T16:00:00.500000Z","log.level":"warning","message":"slow loader",'
            b'"ecs.version":"8.11.0","event.dataset":"traintel.log","log.logger":"py.warnings"}\n'
        )
        head = b'{"@timestamp":"2025-11-24T16:00:01.000000Z","log.level":"error","message":"training failed",'
        head += b'"ecs.version":"8.11.0","event.dataset":"traintel.log","log.logger":"traintel",'
        head += b'"error.type":"ValueError","error.message":"boom",'
        head += b'"error.stack_trace":"Traceback (most recent call last):\\n  File \\"'
        trace = json.loads(failure)["error.stack_trace"]
        assert trace.endswith('    raise ValueError("boom")\nValueError: boom\n')
        assert list(json.loads(failure)) == [
            "@timestamp", "log.level", "message", "ecs.version", "event.dataset", "log.logger",
            "error.type", "error.message", "error.stack_trace",
        ]  # fmt: skip
    assert failure.startswith(head)
    assert b"node-7" not in warning + failure  # the sink's processors are for records
