"""Records are immutable; each sink renders them exactly; the fan-out isolates failures."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import socket
from pathlib import Path
from types import MappingProxyType

import pytest
from prometheus_client import generate_latest

from tests.helpers.lines import strict_object
from traintel.errors import ConfigError
from traintel.records import Record
from traintel.sinks import DiagnosticSink, FanOut, JsonSink, MemorySink, PrometheusSink, RunContext
from traintel.testing import batch_record, end_record, epoch_record, run_context, step_record


def _ctx(tmp_path: Path) -> RunContext:
    return run_context(tmp_path / "run")


def test_records_are_immutable() -> None:
    rec = batch_record()
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.loss = 1.0  # type: ignore[misc]
    with_diag = batch_record(diagnostics=MappingProxyType({"scale_ok": True}))
    with pytest.raises(TypeError):
        with_diag.diagnostics["scale_ok"] = False  # type: ignore[index]


def test_fields_are_ordered_and_carry_schema_version() -> None:
    assert list(batch_record().fields()) == [
        "run_id", "schema_version", "rank", "world_size", "attempt", "epoch", "batch", "batches", "step", "items",
        "raw_loss", "loss", "loss_scale", "window_size",
    ]  # fmt: skip


def test_json_sink_renders_one_exact_line() -> None:
    out = io.BytesIO()
    sink = JsonSink(out)
    sink.open(run_context(Path("unused")))
    sink.emit(batch_record())
    sink.close()
    assert out.getvalue() == (
        b'{"timestamp":"2025-11-24T16:00:00.250000Z","level":"info","event":"train.batch",'
        b'"run_id":"r1","schema_version":"1.5.0","rank":0,"world_size":1,"attempt":0,'
        b'"epoch":1,"batch":2,"batches":10,"step":0,"items":4,'
        b'"raw_loss":0.75,"loss":0.25,"loss_scale":0.3333333333333333,"window_size":3}\n'
    )


def test_json_sink_writes_non_finite_as_null_and_keeps_the_fact() -> None:
    out = io.BytesIO()
    sink = JsonSink(out)
    sink.open(run_context(Path("unused")))
    sink.emit(batch_record(raw_loss=math.nan, loss=math.inf))
    sink.close()
    line = out.getvalue().decode()

    data = strict_object(line)
    assert (data["raw_loss"], data["loss"], data["nonfinite"]) == (
        None,
        None,
        {"raw_loss": "nan", "loss": "inf"},
    )


def test_run_end_failed_is_logged_as_error() -> None:
    out = io.BytesIO()
    sink = JsonSink(out)
    sink.open(run_context(Path("unused")))
    sink.emit(end_record(status="failed", reason="ValueError: boom"))
    sink.close()
    assert json.loads(out.getvalue())["level"] == "error"


def test_diagnostic_sink_adds_diagnostics_and_never_overwrites(tmp_path: Path) -> None:
    sink = DiagnosticSink()
    sink.open(_ctx(tmp_path))
    sink.emit(batch_record(diagnostics=MappingProxyType({"expected_loss_scale": 1 / 3, "scale_ok": True})))
    sink.close()
    sink.close()  # idempotent
    path = tmp_path / "run" / "diagnostic.jsonl"
    assert path.read_bytes() == (
        b'{"timestamp":"2025-11-24T16:00:00.250000Z","level":"info","event":"train.batch",'
        b'"run_id":"r1","schema_version":"1.5.0","rank":0,"world_size":1,"attempt":0,'
        b'"epoch":1,"batch":2,"batches":10,"step":0,"items":4,'
        b'"raw_loss":0.75,"loss":0.25,"loss_scale":0.3333333333333333,"window_size":3,'
        b'"expected_loss_scale":0.3333333333333333,"scale_ok":true}\n'
    )
    again = DiagnosticSink()
    with pytest.raises(
        ConfigError, match=r"already exists and is never overwritten; choose another run\.dir"
    ):
        again.open(_ctx(tmp_path))
    assert path.read_bytes().count(b"\n") == 1


class _Boom:
    name = "boom"

    def __init__(self) -> None:
        self.calls = 0

    def open(self, context: RunContext) -> None:
        pass

    def emit(self, record: Record) -> None:
        self.calls += 1
        raise OSError("disk on fire")

    def close(self) -> None:
        raise OSError("still on fire")


def test_fanout_isolates_a_failing_sink_and_reports_once(tmp_path: Path) -> None:
    boom, mem = _Boom(), MemorySink()
    fan = FanOut([boom, mem])
    fan.open(_ctx(tmp_path))
    records = [batch_record(batch=i) for i in range(1, 4)]
    for r in records:
        fan.emit(r)
    fan.close()
    fan.close()
    assert boom.calls == 3
    assert fan.errors == {"boom": 4, "memory": 0}  # three emits and one close
    events = [r.event for r in mem.records]
    assert events == ["sink.error", "train.batch", "train.batch", "train.batch"]
    err = mem.records[0]
    assert (err.sink, err.error) == ("boom", "OSError: disk on fire")  # type: ignore[attr-defined]
    assert [r for r in mem.records if r.event == "train.batch"] == records
    assert mem.closed == 1


def test_fanout_open_is_all_or_nothing(tmp_path: Path) -> None:
    class CannotOpen(MemorySink):
        def open(self, context: RunContext) -> None:
            raise ConfigError("sinks.x", "cannot open")

    first = MemorySink("first")
    fan = FanOut([first, CannotOpen("second")])
    with pytest.raises(ConfigError, match=r"sinks\.x: cannot open"):
        fan.open(_ctx(tmp_path))
    assert (first.opened, first.closed) == (1, 1)


def test_fanout_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match=r"sink names must be unique, got duplicates \['memory'\]"):
        FanOut([MemorySink(), MemorySink()])


def test_prometheus_exposition_is_exact(tmp_path: Path) -> None:
    class Dropping(MemorySink):
        dropped = 3

    sink = PrometheusSink(port=0)
    fan = FanOut([sink, Dropping("json"), MemorySink("diagnostic")])
    fan.errors["diagnostic"] = 2
    sink.register(fan.health_collector())
    sink.collector.run_id, sink.collector.run_name = "r1", "demo"
    sink.emit(batch_record())
    sink.emit(step_record(grad_norm=2.5))
    sink.emit(epoch_record())
    lines = generate_latest(sink.registry).decode().splitlines(keepends=True)
    process = [line for line in lines if line.startswith(("process_", "# HELP process_", "# TYPE process_"))]
    text = "".join(line for line in lines if line not in process)
    names = [line.split()[2] for line in process if line.startswith("# TYPE")]
    assert names == [
        "process_virtual_memory_bytes", "process_resident_memory_bytes", "process_start_time_seconds",
        "process_cpu_seconds_total", "process_open_fds", "process_max_fds",
    ]  # fmt: skip
    assert text == (
        "# HELP traintel_run_info The run this process trains (value is always 1).\n"
        "# TYPE traintel_run_info gauge\n"
        'traintel_run_info{name="demo",run_id="r1"} 1.0\n'
        "# HELP traintel_epoch Current epoch (1-based).\n"
        "# TYPE traintel_epoch gauge\n"
        "traintel_epoch 1.0\n"
        "# HELP traintel_optimizer_step Optimizer steps completed.\n"
        "# TYPE traintel_optimizer_step gauge\n"
        "traintel_optimizer_step 1.0\n"
        "# HELP traintel_batch_loss Latest emitted micro-batch loss given to backward.\n"
        "# TYPE traintel_batch_loss gauge\n"
        "traintel_batch_loss 0.25\n"
        "# HELP traintel_batch_raw_loss Latest emitted micro-batch mean loss, unscaled.\n"
        "# TYPE traintel_batch_raw_loss gauge\n"
        "traintel_batch_raw_loss 0.75\n"
        "# HELP traintel_batch_loss_scale Latest emitted micro-batch scale n_b/N_t.\n"
        "# TYPE traintel_batch_loss_scale gauge\n"
        "traintel_batch_loss_scale 0.3333333333333333\n"
        "# HELP traintel_step_loss Objective of the latest emitted optimizer step.\n"
        "# TYPE traintel_step_loss gauge\n"
        "traintel_step_loss 0.6875\n"
        "# HELP traintel_learning_rate Learning rate of the latest emitted step.\n"
        "# TYPE traintel_learning_rate gauge\n"
        "traintel_learning_rate 0.001\n"
        "# HELP traintel_grad_norm Gradient norm of the latest emitted step.\n"
        "# TYPE traintel_grad_norm gauge\n"
        "traintel_grad_norm 2.5\n"
        "# HELP traintel_step_timestamp_seconds Unix time of the latest emitted optimizer step.\n"
        "# TYPE traintel_step_timestamp_seconds gauge\n"
        "traintel_step_timestamp_seconds 1.76400000125e+09\n"
        "# HELP traintel_epoch_loss Item-weighted mean training loss of the last epoch.\n"
        "# TYPE traintel_epoch_loss gauge\n"
        "traintel_epoch_loss 0.5\n"
        "# HELP traintel_epoch_items_per_second Training throughput of the last epoch.\n"
        "# TYPE traintel_epoch_items_per_second gauge\n"
        "traintel_epoch_items_per_second 6.0\n"
        "# HELP traintel_items_total Training items processed.\n"
        "# TYPE traintel_items_total counter\n"
        "traintel_items_total 12.0\n"
        "# HELP traintel_sink_errors_total Records a sink failed to take.\n"
        "# TYPE traintel_sink_errors_total counter\n"
        'traintel_sink_errors_total{sink="diagnostic"} 2.0\n'
        'traintel_sink_errors_total{sink="json"} 0.0\n'
        'traintel_sink_errors_total{sink="prometheus"} 0.0\n'
        "# HELP traintel_sink_dropped_records_total Records a sink dropped because its consumer fell behind.\n"
        "# TYPE traintel_sink_dropped_records_total counter\n"
        'traintel_sink_dropped_records_total{sink="json"} 3.0\n'
    )


def test_prometheus_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sink = PrometheusSink(port=port)
        with pytest.raises(ConfigError) as info:
            sink.open(_ctx(tmp_path))
    assert str(info.value) == (
        f"sinks.prometheus.port: 127.0.0.1:{port} is already in use; choose a free port or 0"
    )


def test_prometheus_serves_over_http_and_stops(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    sink = PrometheusSink(port=0)
    sink.open(_ctx(tmp_path))
    url = sink.url
    assert url is not None and url.startswith("http://127.0.0.1:")
    sink.emit(step_record())
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = resp.read().decode()
    assert "traintel_step_loss 0.6875\n" in body
    assert 'traintel_run_info{name="demo",run_id="r1"} 1.0\n' in body
    sink.close()
    sink.close()
    with pytest.raises(urllib.error.URLError, match="Connection refused"):
        urllib.request.urlopen(url, timeout=2)


def test_ecs_profile_renames_the_head_and_keeps_every_value() -> None:
    lines = {}
    for profile in ("default", "ecs"):
        out = io.BytesIO()
        sink = JsonSink(out, profile=profile)
        sink.open(run_context(Path("unused")))
        sink.emit(batch_record(loss=math.nan))
        sink.close()
        lines[profile] = out.getvalue()
    assert lines["ecs"] == (
        b'{"@timestamp":"2025-11-24T16:00:00.250000Z","log.level":"info","message":"train.batch",'
        b'"ecs.version":"8.11.0","event.dataset":"traintel.records","event.action":"train.batch",'
        b'"traintel.run_id":"r1","traintel.schema_version":"1.5.0","traintel.rank":0,"traintel.world_size":1,'
        b'"traintel.attempt":0,"traintel.epoch":1,"traintel.batch":2,"traintel.batches":10,"traintel.step":0,'
        b'"traintel.items":4,"traintel.raw_loss":0.75,"traintel.loss":null,'
        b'"traintel.loss_scale":0.3333333333333333,"traintel.window_size":3,'
        b'"traintel.nonfinite":{"loss":"nan"}}\n'
    )
    default, ecs = json.loads(lines["default"]), json.loads(lines["ecs"])
    renamed = {"timestamp": "@timestamp", "level": "log.level", "event": "message"}
    added = {"ecs.version": "8.11.0", "event.dataset": "traintel.records", "event.action": "train.batch"}
    assert {renamed.get(k, f"traintel.{k}"): v for k, v in default.items()} | added == ecs
    with pytest.raises(ValueError, match="profile must be 'default' or 'ecs', got 'gelf'"):
        JsonSink(profile="gelf")


def test_the_exporter_keeps_the_newest_record_of_each_kind_from_a_batch() -> None:
    sink = PrometheusSink(port=0)
    first_step, last_step = step_record(step=1, items_total=12), step_record(step=2, items_total=24)
    last_batch = batch_record(step=2, batch=7)
    sink.emit_many([first_step, batch_record(step=1), last_step, last_batch])
    latest = sink.collector.latest
    assert (latest.step, latest.batch, latest.progress, latest.items_total) == (
        last_step,
        last_batch,
        last_batch,
        24,
    )
    assert latest.step is last_step and latest.batch is last_batch
    end = end_record(step=2, items_total=24)
    sink.emit_many([epoch_record(step=2, items_total=24), end])
    assert (sink.collector.latest.progress, sink.collector.latest.end) == (end, end)
