"""build_sinks: config becomes plain sink parameters, each sink renders its own lines, sink health is exported."""

from __future__ import annotations

import io
from pathlib import Path
from types import MappingProxyType
from typing import Any

from prometheus_client import generate_latest

from traintel.config import SinksConfig
from traintel.run.assembly import build_sinks
from traintel.sinks import DiagnosticSink, MemorySink, Pushgateway
from traintel.testing import batch_record, run_context


def _config(**sections: Any) -> SinksConfig:
    return SinksConfig.model_validate({"prometheus": {"port": 0}, **sections})


def test_sinks_come_in_delivery_order_and_share_no_state() -> None:
    built = build_sinks(_config(json={"profile": "ecs"}), extra=[MemorySink()], json_stream=io.BytesIO())
    assert [s.name for s in built.fanout.sinks] == ["prometheus", "json", "diagnostic", "memory"]
    assert built.prometheus is built.fanout.sinks[0] and built.json is built.fanout.sinks[1]
    diagnostic = built.fanout.sinks[2]
    assert isinstance(diagnostic, DiagnosticSink)
    assert built.json is not None and diagnostic.renderer is not built.json.renderer
    assert (built.json.profile, built.json.console) == ("ecs", False)


def test_the_fanouts_health_is_served_by_the_exporter() -> None:
    built = build_sinks(_config(), extra=[MemorySink()], json_stream=io.BytesIO())
    built.fanout.errors["memory"] = 5
    assert built.prometheus is not None
    text = generate_latest(built.prometheus.registry).decode()
    health = text[text.index("# HELP traintel_sink_errors_total") :]
    assert health == (
        "# HELP traintel_sink_errors_total Records a sink failed to take.\n"
        "# TYPE traintel_sink_errors_total counter\n"
        'traintel_sink_errors_total{sink="diagnostic"} 0.0\n'
        'traintel_sink_errors_total{sink="json"} 0.0\n'
        'traintel_sink_errors_total{sink="memory"} 5.0\n'
        'traintel_sink_errors_total{sink="prometheus"} 0.0\n'
        "# HELP traintel_sink_dropped_records_total Records a sink dropped because its consumer fell behind.\n"
        "# TYPE traintel_sink_dropped_records_total counter\n"
        'traintel_sink_dropped_records_total{sink="diagnostic"} 0.0\n'
        'traintel_sink_dropped_records_total{sink="json"} 0.0\n'
    )


def test_the_pushgateway_section_becomes_plain_parameters() -> None:
    pg = {"url": "http://gw:9091", "job": "nightly", "username": "ci", "password": "s3cret",
          "timeout_seconds": 2.5}  # fmt: skip
    built = build_sinks(_config(prometheus={"port": 0, "pushgateway": pg}))
    assert built.prometheus is not None
    assert built.prometheus.pushgateway == Pushgateway(
        url="http://gw:9091", job="nightly", username="ci", password="s3cret", timeout_seconds=2.5
    )
    unset = build_sinks(_config())
    assert unset.prometheus is not None and unset.prometheus.pushgateway is None


def test_the_diagnostic_file_holds_the_json_line_plus_its_extras(tmp_path: Path) -> None:
    out = io.BytesIO()
    built = build_sinks(_config(prometheus={"enabled": False}), json_stream=out)
    assert built.json is not None and built.prometheus is None
    record = batch_record(diagnostics=MappingProxyType({"scale_ok": True}))
    built.fanout.open(run_context(tmp_path))
    built.fanout.emit_many([record])
    built.fanout.close()
    line = (
        b'{"timestamp":"2025-11-24T16:00:00.250000Z","level":"info","event":"train.batch",'
        b'"run_id":"r1","schema_version":"1.5.0","rank":0,"world_size":1,"attempt":0,"epoch":1,"batch":2,"batches":10,"step":0,"items":4,'
        b'"raw_loss":0.75,"loss":0.25,"loss_scale":0.3333333333333333,"window_size":3'
    )
    assert out.getvalue() == line + b"}\n"
    assert (tmp_path / "diagnostic.jsonl").read_bytes() == line + b',"scale_ok":true}\n'
