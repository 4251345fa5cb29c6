"""The MLflow sink: what a run logs, read back with MLflow's own client, is the records' values exactly.

MLflow stores metric values as float64, so every value is compared with ``==``, never approximately;
timestamps are the records' ``time`` in whole milliseconds. The quick tests use a SQLite store in
the test's directory (MLflow 3 refuses a plain ``mlruns`` directory unless told otherwise); the slow
ones start a real ``mlflow server``.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from ignite.engine import Events
from ignite.metrics import MeanAbsoluteError

from tests.helpers import resume
from tests.helpers.children import child_env, popen
from tests.helpers.mlflow_server import mlflow_server
from tests.helpers.paths import ROOT
from tests.helpers.runs import quiet_config
from tests.helpers.servers import free_port, wait_until
from tests.helpers.tasks import loss_failing_at, make_batches, make_model
from traintel.errors import ConfigError
from traintel.records import Record, RunStartRecord, SinkErrorRecord, thaw
from traintel.sinks.memory import MemorySink
from traintel.sinks.mlflow import MlflowSink, MlflowSinkError
from traintel.task import Task
from traintel.testing import (
    T0,
    check_sink,
    end_record,
    epoch_record,
    eval_record,
    metric_record,
    run_context,
    step_record,
)

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

SECRET = "s3cr3t-pa55"
"""A password in tracking URIs and configs, which must appear nowhere."""

Point = tuple[int, float, int]
"""(step, value, timestamp in ms)."""


def _uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


# the spec, restated independently of the sink


def _expected(records: Iterable[Record]) -> dict[str, list[Point]]:
    """What MLflow must hold per metric key for these records."""
    out: dict[str, list[Point]] = {}

    def add(key: str, value: float | None, record: Any) -> None:
        if value is not None:
            out.setdefault(key, []).append((record.step, value, int(record.time * 1000)))

    for r in records:
        if r.event == "train.step":
            for key, value in [("loss", r.loss), ("lr", r.lr), ("grad_norm", r.grad_norm),  # type: ignore[attr-defined]
                               ("grad_scale", r.grad_scale), *r.metrics.items()]:  # type: ignore[attr-defined]  # fmt: skip
                add(f"train/{key}", value, r)
        elif r.event == "train.epoch":
            add("train/epoch_loss", r.loss, r)  # type: ignore[attr-defined]
        elif r.event == "eval.epoch":
            prefix = "eval" if r.split == "val" else f"eval/{r.split}"  # type: ignore[attr-defined]
            for key, value in [("loss", r.loss), *r.metrics.items()]:  # type: ignore[attr-defined]
                add(f"{prefix}/{key}", value, r)
        elif r.event == "metric":
            for key, value in r.metrics.items():  # type: ignore[attr-defined]
                add(f"user/{key}", value, r)
    return {k: sorted(v, key=lambda p: (p[0], p[2])) for k, v in out.items()}


def _flat(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """Dotted keys to leaves; a string as it is, anything else (a list, null, a number) as JSON."""
    for key, value in config.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping) and value:
            yield from _flat(value, path)
        elif isinstance(value, str):
            yield path, value
        else:
            yield path, json.dumps(thaw(value))


def _read(client: MlflowClient, run_id: str) -> dict[str, list[Point]]:
    """Every metric's whole history, with MLflow's own client."""
    keys = client.get_run(run_id).data.metrics
    return {
        key: sorted(((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)),
                    key=lambda p: (p[0], p[2]))
        for key in keys
    }  # fmt: skip


def _runs(client: MlflowClient, experiment: str = "traintel") -> list[Any]:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}"
    return list(client.search_runs([found.experiment_id]))


def _task(**extra: Any) -> Task:
    return Task(
        model=make_model(),
        loss_fn=extra.pop("loss_fn", torch.nn.functional.mse_loss),
        train_loader=make_batches([4, 4, 3, 2, 5, 4]),
        **extra,
    )


def _log_every_epoch(run: Any) -> None:
    """``Run.log`` a value at each epoch's end (``metric`` records)."""
    run.trainer.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda _: run.log({"weight_norm": torch.linalg.vector_norm(run.model[0].weight)}),
    )


# (a) the contract kit, with the values read back


def _read_back(sink: MlflowSink) -> list[dict[str, Any]]:
    """Rows for check_sink from the MLflow run: one per record, keyed by its fields."""
    assert sink.tracking_uri is not None and sink.mlflow_run_id is not None
    got = _read(MlflowClient(sink.tracking_uri), sink.mlflow_run_id)
    rows: list[dict[str, Any]] = []
    for event, columns in {
        "train.step": {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm"},
        "train.epoch": {"loss": "train/epoch_loss"},
        "eval.epoch": {"loss": "eval/loss"},
    }.items():
        series = {field: got[key] for field, key in columns.items()}
        for points in zip(*series.values(), strict=True):
            assert len({(s, t) for s, _, t in points}) == 1, f"{event}: keys at different steps or times"
            row = {"event": event, "step": points[0][0], "timestamp": points[0][2]}
            row.update({field: p[1] for field, p in zip(series, points, strict=True)})
            rows.append(row)
    return rows


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_contract_and_every_value_read_back_is_the_record_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    """Through a local SQLite store, and a local file store (``./mlruns``, which MLflow 3 takes only
    with ``MLFLOW_ALLOW_FILE_STORE=true``)."""
    if store == "file":
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (tmp_path / "mlruns").as_uri()
    else:
        uri = _uri(tmp_path)
    results = check_sink(
        lambda: MlflowSink(tracking_uri=uri, timeout=60),
        read_back=_read_back,
        events={"train.step", "train.epoch", "eval.epoch"},
        base_dir=tmp_path,
    )

    client = MlflowClient(uri)
    assert len(results) == 3 and len(_runs(client)) == 3  # two runs, and one resumed: its attempts share one
    for i, result in enumerate(results):
        sink = result.sink
        assert sink.failures == 0 and sink.dropped == 0
        got = _read(client, sink.mlflow_run_id)
        want = _expected(result.records)
        if i < 2:
            assert got == want
        else:  # the resumed attempt's values follow the first attempt's in the same MLflow run
            assert {k: v[-len(want[k]) :] for k, v in got.items()} == want
        stamps = {(row["event"], row["step"]): row["timestamp"] for row in result.rows}
        assert all(
            stamps[(r.event, r.step)] == int(r.time * 1000)  # type: ignore[attr-defined]
            for r in result.records
            if r.event in ("train.step", "train.epoch", "eval.epoch")
        )
        run = client.get_run(sink.mlflow_run_id)
        assert run.info.status == "FINISHED"
        assert (run.data.tags["traintel.run_id"], run.data.tags["traintel.attempt"]) == (
            result.records[0].run_id,
            str(result.records[0].attempt),
        )
    assert results[2].records[0].attempt == 1


# (b) a run through the entry point: metrics, params, tags, status


def test_a_run_logs_every_value_its_redacted_config_its_tags_and_its_end(tmp_path: Path) -> None:
    from traintel.run.api import build

    uri = _uri(tmp_path)
    cfg = quiet_config(tmp_path, max_epochs=2, accumulation_steps=2, grad_clip_norm=1.0)
    cfg["sinks"]["prometheus"]["pushgateway"] = {"url": "http://gw:9091", "username": "u", "password": SECRET}
    cfg["sinks"]["extra"] = [
        {"name": "mlflow", "params": {"tracking_uri": uri, "experiment": "exp-b", "timeout": 60}}
    ]
    task = _task(
        val_loaders={"val": make_batches([3, 3], seed=1), "test": make_batches([2, 4], seed=2)},
        metrics={"mae": MeanAbsoluteError()},
        train_metrics={"first_share": lambda out: out.losses[0]},
    )
    memory = MemorySink()
    run = build(cfg, task, sinks=[memory])
    _log_every_epoch(run)
    end = run.run()
    assert end.status == "completed"

    client = MlflowClient(uri)
    (found,) = _runs(client, "exp-b")
    run_id = found.info.run_id
    got = _read(client, run_id)
    assert set(got) == {
        "train/loss", "train/lr", "train/grad_norm", "train/first_share", "train/epoch_loss",
        "eval/loss", "eval/mae", "eval/test/loss", "eval/test/mae", "user/weight_norm",
    }  # fmt: skip
    assert got == _expected(memory.records)
    steps = memory.of("train.step")
    assert [(s, v) for s, v, _ in got["train/loss"]] == [(r.step, r.loss) for r in steps]  # type: ignore[attr-defined]
    assert len(steps) == 6

    (start,) = memory.of("run.start")
    params = found.data.params
    assert params == dict(_flat(start.config))  # type: ignore[attr-defined]
    assert params["sinks.prometheus.pushgateway.password"] == "***"
    assert params["trainer.max_epochs"] == "2" and params["run.id"] == "test-run"
    assert SECRET not in json.dumps(params)

    tags = {k: v for k, v in found.data.tags.items() if k.startswith("traintel.")}
    assert tags == {
        "traintel.run_id": "test-run",
        "traintel.attempt": "0",
        "traintel.world_size": "1",
        "traintel.reason": "max_epochs",
    }
    assert found.info.run_name == "traintel"  # the traintel run's name
    assert found.info.status == "FINISHED"
    assert found.info.end_time == int(end.time * 1000)


def test_a_failing_run_is_failed_with_the_steps_before_it(tmp_path: Path) -> None:
    from traintel.run.api import build

    uri = _uri(tmp_path)
    cfg = quiet_config(tmp_path, max_epochs=2)
    sink = MlflowSink(tracking_uri=uri, run_name="broken", timeout=60)
    memory = MemorySink()
    with pytest.raises(RuntimeError, match="loss exploded"):
        build(cfg, _task(loss_fn=loss_failing_at(9, "loss exploded")), sinks=[memory, sink]).run()
    (end,) = memory.of("run.end")
    assert end.status == "failed"  # type: ignore[attr-defined]

    client = MlflowClient(uri)
    (found,) = _runs(client)
    assert (found.info.status, found.info.run_name) == ("FAILED", "broken")
    assert "loss exploded" in found.data.tags["traintel.reason"]
    assert _read(client, found.info.run_id) == _expected(memory.records)
    assert len(memory.of("train.step")) == 2  # the third step's last micro-batch raised


@pytest.mark.parametrize(("status", "expected"), [("completed", "FINISHED"), ("terminated", "KILLED"),
                                                  ("failed", "FAILED")])  # fmt: skip
def test_each_end_status_maps_to_mlflow_s(tmp_path: Path, status: str, expected: str) -> None:
    uri = _uri(tmp_path)
    sink = MlflowSink(tracking_uri=uri, timeout=60)
    sink.open(run_context(tmp_path / "run"))
    sink.emit(step_record())
    sink.emit(end_record(status=status, reason="why"))
    sink.close()
    (found,) = _runs(MlflowClient(uri))
    assert (found.info.status, found.data.tags["traintel.reason"]) == (expected, "why")


# the sink on its own


def test_non_finite_values_odd_names_long_and_many_params_and_chunked_batches(tmp_path: Path) -> None:
    uri = _uri(tmp_path)
    config = {
        "long": "x" * 7000,
        "nested": {"list": [1, {"a": None}], "empty": {}, "flag": True, "none": None},
        "bad key!": "v",
        "many": {f"p{i}": i for i in range(250)},
    }
    records: list[Record] = [
        RunStartRecord(
            run_id="r1",
            time=1.0,
            name="n",
            run_dir="d",
            device="cpu",
            config=config,
            metrics_url=None,
            optimizer="torch.optim.sgd.SGD",
        ),
        step_record(loss=math.nan, grad_norm=math.inf, metrics={"a/../b": 1.0, "x@y": 2.0}),
        step_record(step=2, loss=0.25, metrics={f"m{i}": float(i) for i in range(1500)}),
        epoch_record(loss=math.inf),
        eval_record(loss=-math.inf, split="hold out"),
        metric_record(metrics={"v": -0.5}),
        SinkErrorRecord(run_id="r1", time=2.75, sink="x", error="boom"),
        end_record(),
    ]
    sink = MlflowSink(tracking_uri=uri, timeout=60)
    sink.open(run_context(tmp_path / "run"))
    sink.emit_many(records)
    sink.close()

    client = MlflowClient(uri)
    (found,) = _runs(client)
    got = _read(client, found.info.run_id)
    t1, t2 = int(records[1].time * 1000), int(records[3].time * 1000)
    assert math.isnan(got["train/loss"][0][1]) and got["train/loss"][1] == (2, 0.25, t1)
    # SQL stores keep NaN but hold +-inf as the largest finite double
    assert got["train/grad_norm"] == [(1, 1.7976931348623157e308, t1)]
    assert got["train/epoch_loss"] == [(1, 1.7976931348623157e308, t2)]
    assert got["eval/hold out/loss"] == [(1, -1.7976931348623157e308, t2)]
    assert got["train/a/__/b"] == [(1, 1.0, t1)] and got["train/x_y"] == [(1, 2.0, t1)]
    assert got["user/v"] == [(1, -0.5, int(records[5].time * 1000))]
    assert all(got[f"train/m{i}"] == [(2, float(i), t1)] for i in range(1500))  # over two requests

    params = found.data.params
    assert len(params) == 256
    assert params["long"] == "x" * 5999 + "…"  # MLflow's limit is 6000 characters
    assert params["nested.list"] == '[1, {"a": null}]' and params["nested.empty"] == "{}"
    assert (params["nested.flag"], params["nested.none"], params["bad key_"]) == ("true", "null", "v")
    assert all(params[f"many.p{i}"] == str(i) for i in range(250))  # over three requests


def test_every_request_stays_within_mlflow_s_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most 1000 metrics, 100 params and 100 tags a request (MLflow's client would split larger ones
    itself, but not by size), and under MLflow's 1 MB on a request's body."""
    requests: list[tuple[int, int, int, int]] = []
    real = MlflowClient.log_batch

    def log_batch(
        self: MlflowClient, run_id: str, metrics: Any = (), params: Any = (), tags: Any = ()
    ) -> Any:
        body = json.dumps([{"key": e.key, "value": e.value} for e in [*params, *tags]])
        requests.append((len(metrics), len(params), len(tags), len(body) + 100 * len(metrics)))
        return real(self, run_id, metrics=metrics, params=params, tags=tags)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    uri = _uri(tmp_path)
    config = {"small": {f"p{i}": i for i in range(150)}, "wide": {f"w{i}": "é" * 6500 for i in range(40)}}
    records: list[Record] = [
        RunStartRecord(run_id="r1", time=1.0, name="n", run_dir="d", device="cpu", config=config,
                       metrics_url=None, optimizer="torch.optim.sgd.SGD"),
        step_record(metrics={f"m{i}": float(i) for i in range(1500)}),
        end_record(reason="r" * 9000),
    ]  # fmt: skip
    sink = MlflowSink(tracking_uri=uri, timeout=60)
    sink.open(run_context(tmp_path / "run"))
    sink.emit_many(records)
    sink.close()

    params = [r for r in requests if r[1]]
    assert sum(r[1] for r in params) == 190 and all(r[1] <= 100 for r in params)
    assert all(r[3] < 1_000_000 for r in requests) and len(params) >= 3  # the wide ones split by size
    assert [r[:3] for r in requests if not r[1]] == [(1000, 0, 0), (502, 0, 0)]  # tags came with the new run
    (found,) = _runs(MlflowClient(uri))
    assert len(found.data.params) == 190 and found.data.params["wide.w0"] == "é" * 5999 + "…"
    assert found.data.tags["traintel.reason"] == "r" * 7999 + "…"  # MLflow's limit is 8000 characters
    assert len(_read(MlflowClient(uri), found.info.run_id)) == 1502


def test_a_resumed_attempt_continues_the_run_and_keeps_the_first_params(tmp_path: Path) -> None:
    uri = _uri(tmp_path)
    start = {"run_id": "r1", "name": "n", "run_dir": "d", "device": "cpu", "metrics_url": None,
             "optimizer": "torch.optim.sgd.SGD"}  # fmt: skip
    first = MlflowSink(tracking_uri=uri, timeout=60)
    first.open(run_context(tmp_path / "run"))
    first.emit(RunStartRecord(time=1.0, config={"a": 1, "b": 2}, **start))
    first.emit_many([step_record(), step_record(step=2, loss=0.5)])
    first.close()  # killed: no run.end, the run stays RUNNING

    second = MlflowSink(tracking_uri=uri, timeout=60)
    second.open(run_context(tmp_path / "run", attempt=1, world_size=1))
    second.emit(RunStartRecord(time=5.0, config={"a": 1, "b": 3, "c": 4}, attempt=1, **start))
    again = [step_record(step=2, loss=0.5, time=T0 + 9, attempt=1), step_record(step=3, loss=0.75, attempt=1)]
    second.emit_many(again)
    second.emit(end_record(attempt=1))
    second.close()

    client = MlflowClient(uri)
    (found,) = _runs(client)
    assert second.mlflow_run_id == first.mlflow_run_id == found.info.run_id
    assert (found.info.status, found.data.tags["traintel.attempt"]) == ("FINISHED", "1")
    assert found.data.params == {"a": "1", "b": "2", "c": "4"}  # b keeps the first attempt's value
    assert [(s, v) for s, v, _ in _read(client, found.info.run_id)["train/loss"]] == [
        (1, 0.6875), (2, 0.5), (2, 0.5), (3, 0.75),
    ]  # fmt: skip


def test_a_rank_other_than_zero_sends_nothing(tmp_path: Path) -> None:
    sink = MlflowSink(tracking_uri=_uri(tmp_path))
    sink.open(run_context(tmp_path / "run", rank=1, world_size=2))
    sink.emit_many([step_record(), end_record()])
    sink.close()
    assert not (tmp_path / "mlflow.db").exists() and sink.mlflow_run_id is None


def test_lifecycle_errors_and_idempotent_close(tmp_path: Path) -> None:
    sink = MlflowSink(tracking_uri=_uri(tmp_path))
    assert (sink.name, sink.threaded) == ("mlflow", True)
    sink.close()  # before open: harmless
    with pytest.raises(RuntimeError, match="before open"):
        sink.emit(step_record())
    sink.open(run_context(tmp_path / "run"))
    sink.emit(step_record())
    sink.close()
    sink.close()
    with pytest.raises(RuntimeError, match="after close"):
        sink.emit_many([step_record()])


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"timeout": 0}, "timeout must be a positive number of seconds"),
        ({"close_timeout": "soon"}, "close_timeout must be a positive number"),
        ({"retry_seconds": -1}, "retry_seconds must be a non-negative number"),
        ({"retry_seconds": -0.5}, "retry_seconds must be a non-negative number"),
        ({"timeout": float("nan")}, "timeout must be a positive number"),
        ({"max_buffer": 0}, "max_buffer must be a positive number of records"),
        ({"experiment": " "}, "experiment must be a non-empty name"),
        ({"unknown": 1}, "unexpected keyword argument 'unknown'"),
    ],
)
def test_bad_params_are_config_errors(tmp_path: Path, params: dict[str, Any], match: str) -> None:
    from traintel.run.api import build

    cfg = quiet_config(tmp_path)
    cfg["sinks"]["extra"] = [{"name": "mlflow", "params": params}]
    with pytest.raises(ConfigError, match=match) as info:
        build(cfg, _task()).run()
    assert info.value.key.startswith("sinks.extra[0]")


def test_without_mlflow_or_without_sqlalchemy_open_says_what_to_install() -> None:
    code = """
import sys
from pathlib import Path

sys.modules[sys.argv[1]] = None  # as if not installed: importing it fails, find_spec finds nothing
from traintel.errors import ConfigError
from traintel.sinks.mlflow import MlflowSink
from traintel.testing import run_context
assert all(sys.modules[m] is None for m in sys.modules if m.partition(".")[0] == "mlflow")  # not imported
for uri in ("sqlite:///x.db", "http://127.0.0.1:1"):
    try:
        MlflowSink(tracking_uri=uri).open(run_context(Path("unused")))
        print(uri, "opened")
    except ConfigError as exc:
        print(uri, exc)
"""
    seen = {}
    for blocked in ("mlflow", "sqlalchemy"):
        out = subprocess.run(
            [sys.executable, "-c", code, blocked], capture_output=True, text=True, check=True, cwd=ROOT
        )
        seen[blocked] = out.stdout.splitlines()
    hint = "sinks.extra: the mlflow sink needs `pip install 'traintel[mlflow]'`"
    assert seen["mlflow"] == [f"sqlite:///x.db {hint}", f"http://127.0.0.1:1 {hint}"]
    assert seen["sqlalchemy"] == [
        "sqlite:///x.db sinks.extra: the mlflow sink's tracking URI sqlite:///x.db is a database store, which "
        "needs `pip install mlflow` (traintel[mlflow] installs the client for a tracking server only)",
        "http://127.0.0.1:1 opened",
    ]


# an unreachable tracking server: one failure, reported once, quickly; no credentials anywhere


@pytest.mark.parametrize("retries", ["mlflow's default", "0"])
def test_an_unreachable_server_fails_once_fast_and_hides_the_credentials(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    retries: str,
) -> None:
    from traintel.run.api import build

    if retries == "0":  # MLflow's own retries off: its error comes back at once
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    calls: list[str] = []
    for method in ("get_experiment_by_name", "create_experiment", "create_run", "log_batch", "search_runs"):
        real = getattr(MlflowClient, method)
        monkeypatch.setattr(
            MlflowClient, method, lambda *a, _m=method, _r=real, **k: calls.append(_m) or _r(*a, **k)
        )
    caplog.set_level(logging.DEBUG)
    uri = f"http://alice:{SECRET}@127.0.0.1:{free_port()}"  # nobody listens there
    sink = MlflowSink(tracking_uri=uri, timeout=1.0, retry_seconds=600, close_timeout=1.0)
    assert sink.shown_uri == uri.replace(f"alice:{SECRET}", "***")

    cfg = quiet_config(tmp_path, max_epochs=3)
    memory = MemorySink()
    run = build(cfg, _task(), sinks=[memory, sink])

    def wait_for_the_failure(_: Any) -> None:  # delivered on a thread, it fails after training went on
        wait_until(lambda: sink.failures, "the sink never failed", timeout=30)

    run.trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2), wait_for_the_failure)
    began = time.monotonic()
    end = run.run()
    took = time.monotonic() - began

    assert end.status == "completed"
    assert len(memory.of("train.step")) == 6  # training went on
    errors = memory.of("sink.error")
    assert [e.sink for e in errors] == ["mlflow"]  # type: ignore[attr-defined]
    error = errors[0].error  # type: ignore[attr-defined]
    assert error.startswith(f"MlflowSinkError: MLflow at http://***@127.0.0.1:{uri.rsplit(':', 1)[1]}: ")
    if retries == "0":
        assert (
            "MlflowException: API request to http://***@127.0.0.1:" in error and "Connection refused" in error
        )
    else:
        assert error.endswith(": TimeoutError: start the run: no answer within 1 s")
    assert calls == ["get_experiment_by_name"]  # one try, then nothing for retry_seconds
    assert (sink.failures, run.fanout.errors["mlflow"], sink.mlflow_run_id) == (1, 1, None)
    assert took < 20, f"the run took {took:.1f} s"
    out, err = capfd.readouterr()
    for text in (error, caplog.text, out, err, sink.last_error or ""):
        assert SECRET not in text and "alice" not in text
    assert "records) not sent to MLflow: MLflow at http://***@127.0.0.1:" in caplog.text


def test_the_password_is_hidden_wherever_a_message_repeats_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: MlflowClient, name: str) -> Any:
        raise PermissionError(
            f"user alice, password s3cr3t/pa55 (s3cr3t%2Fpa55) refused at {self.tracking_uri}"
        )

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", refuse)
    sink = MlflowSink(tracking_uri=f"http://alice:s3cr3t%2Fpa55@127.0.0.1:{free_port()}", timeout=60)
    sink.open(run_context(tmp_path / "run"))
    with pytest.raises(MlflowSinkError) as info:
        sink.emit(epoch_record())  # not a step: sent at once
    sink.close()
    assert str(info.value) == (
        f"MLflow at {sink.shown_uri}: PermissionError: user alice, password *** (***) refused at {sink.shown_uri}"
    )
    assert sink.shown_uri is not None and sink.shown_uri.startswith("http://***@127.0.0.1:")


def test_a_failure_keeps_the_records_and_sends_them_when_mlflow_answers_again(tmp_path: Path) -> None:
    uri = _uri(tmp_path)
    sink = MlflowSink(tracking_uri=uri, timeout=60, retry_seconds=0, max_buffer=3)
    sink.open(run_context(tmp_path / "run"))
    real = MlflowClient.log_batch
    failing = {"on": True}

    def log_batch(self: MlflowClient, *args: Any, **kwargs: Any) -> Any:
        if failing["on"] and kwargs.get("metrics"):
            raise ConnectionError(f"down, said http://bob:{SECRET}@h")
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MlflowClient, "log_batch", log_batch)
        with pytest.raises(MlflowSinkError, match=r"ConnectionError: down, said http://\*\*\*@h") as info:
            sink.emit_many([step_record(step=s, loss=s / 8) for s in (1, 2)])
        assert SECRET not in str(info.value)
        with pytest.raises(MlflowSinkError):
            sink.emit_many([step_record(step=s, loss=s / 8) for s in (3, 4)])
        assert (sink.failures, sink.dropped) == (2, 1)  # max_buffer: step 1's record went
        failing["on"] = False
        sink.emit_many([step_record(step=5, loss=5 / 8)])
    sink.emit(end_record(step=5))
    sink.close()
    got = _read(MlflowClient(uri), sink.mlflow_run_id or "")
    assert [(s, v) for s, v, _ in got["train/loss"]] == [(s, s / 8) for s in (3, 4, 5)]
    assert (sink.failures, sink.dropped) == (2, 2)  # and step 2's when step 5's came


# against a real tracking server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.mark.slow
def test_through_a_tracking_server_values_params_and_statuses_are_exact(server: str, tmp_path: Path) -> None:
    from traintel.run.api import build

    uri = server.replace("http://", f"http://alice:{SECRET}@")  # the server ignores them; never shown
    runs = {}
    for name, task in (("good", _task(val_loader=make_batches([3, 3], seed=1))),
                       ("bad", _task(loss_fn=loss_failing_at(9, "loss exploded")))):  # fmt: skip
        cfg = quiet_config(tmp_path / name, max_epochs=2, grad_clip_norm=1.0)
        cfg["run"]["id"] = f"server-{name}"
        cfg["sinks"]["extra"] = [
            {"name": "mlflow", "params": {"tracking_uri": uri, "experiment": "exp-server"}}
        ]
        memory = MemorySink()
        run = build(cfg, task, sinks=[memory])
        if name == "good":
            _log_every_epoch(run)
            run.run()
        else:
            with pytest.raises(RuntimeError, match="loss exploded"):
                run.run()
        runs[name] = (memory.of("run.end")[0], memory)
        assert run.fanout.errors["mlflow"] == 0

    client = MlflowClient(server)
    found = {r.data.tags["traintel.run_id"]: r for r in _runs(client, "exp-server")}
    assert sorted(found) == ["server-bad", "server-good"]
    for name, (end, memory) in runs.items():
        mlrun = found[f"server-{name}"]
        assert _read(client, mlrun.info.run_id) == _expected(memory.records)
        (start,) = memory.of("run.start")
        assert mlrun.data.params == dict(_flat(start.config))  # type: ignore[attr-defined]
        assert mlrun.data.params["sinks.extra"].count("***@127.0.0.1") == 1
        assert SECRET not in json.dumps(mlrun.data.params)
        assert mlrun.info.status == {"good": "FINISHED", "bad": "FAILED"}[name]
        assert mlrun.info.end_time == int(end.time * 1000)
    assert len(runs["good"][1].of("train.step")) == 4 and len(runs["bad"][1].of("train.step")) == 2


@pytest.mark.slow
def test_a_run_killed_and_resumed_continues_its_mlflow_run_without_a_gap(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # credentials in the environment, not in the config, whose saved copy has them redacted
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.replace("http://", f"http://alice:{SECRET}@"))
    cfg = resume.config(
        0
    )  # 12 steps of 4 micro-batches (3 a window at each epoch's end); checkpoints every 3
    cfg["telemetry"]["max_delay_seconds"] = 0  # each step's records go out at once
    cfg["sinks"]["extra"] = [{"name": "mlflow", "params": {"experiment": "exp-resume"}}]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    client = MlflowClient(server)

    def logged_steps() -> set[int]:
        runs = _runs(client, "exp-resume") if client.get_experiment_by_name("exp-resume") else []
        return {m.step for r in runs for m in client.get_metric_history(r.info.run_id, "train/loss")}

    # attempt 0 pauses in step 8 (training call 30); once MLflow has step 7, after step 6's
    # checkpoint, it is killed: the resumed attempt logs step 7 again
    env = child_env(extra={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RESUME_TEST_AT": "sleep:30:600"})
    with (tmp_path / "attempt0.out").open("w") as out:
        proc = popen(
            [sys.executable, "-m", "traintel", "train", "-c", "config.yaml", "--set", f"run.dir={run_dir}"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    try:
        assert proc.stderr is not None
        seen: list[str] = []
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("sleeping at 30"):
                break
        else:
            pytest.fail(f"attempt 0 ended before its pause: {''.join(seen)[-3000:]}")
        wait_until(lambda: 7 in logged_steps(), lambda: f"MLflow holds steps {sorted(logged_steps())}")
    finally:
        proc.kill()
        _, err0 = proc.communicate(timeout=60)
    assert proc.returncode == -9
    assert logged_steps() == set(range(1, 8))
    (first,) = _runs(client, "exp-resume")
    assert first.info.status == "RUNNING"

    resumed = resume.traintel(["--resume", str(run_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = next(line for line in resume.lines(resumed.stdout) if line["event"] == "run.start")
    assert (start["attempt"], start["resumed_from_step"]) == (1, 6)

    (found,) = _runs(client, "exp-resume")  # the same run, continued
    assert found.info.run_id == first.info.run_id
    assert found.data.tags["traintel.run_id"] == start["run_id"]
    assert (found.info.status, found.data.tags["traintel.attempt"]) == ("FINISHED", "1")
    losses = resume.losses((run_dir / "diagnostic.jsonl").read_text())  # both attempts' steps
    history = _read(client, found.info.run_id)["train/loss"]
    assert [s for s, _, _ in history] == [1, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10, 11, 12]  # no gap; 7 twice
    for step, value, _ in history:  # the same value both times
        assert value.hex() == losses[step], step
    for text in (
        (tmp_path / "attempt0.out").read_text(),
        "".join(seen),
        err0,
        resumed.stdout,
        resumed.stderr,
    ):
        assert SECRET not in text and "View run" not in text
