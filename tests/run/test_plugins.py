"""Plugin sinks: entry points and import paths, the contract kit, and one-line errors for bad plugins."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from traintel_csv_sink import CsvSink

from tests.helpers.children import run_child
from tests.helpers.paths import ROOT
from tests.helpers.runs import quiet_config
from tests.helpers.tasks import make_batches, make_model
from traintel.records import Record
from traintel.run.api import build
from traintel.sinks import DiagnosticSink, JsonSink, MemorySink, PrometheusSink, RunContext
from traintel.task import Task
from traintel.testing import SinkContractError, check_sink

CONFIG = ROOT / "configs" / "default.yaml"


def _cli(tmp_path: Path, *args: str, files: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    env["PYTHONPATH"] = str(tmp_path)
    return run_child(
        [sys.executable, "-m", "traintel", *args],
        cwd=tmp_path,
        env=env,
    )


def _lines(buffer: io.BytesIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def _csv_rows(sink: CsvSink) -> list[dict[str, Any]]:
    path = Path(sink._file.name if sink._file else sink.path or "")
    with path.open(newline="") as f:
        return [{"event": "train.step", **{k: float(v) if "." in v or "e" in v else int(v) for k, v in row.items()}}
                for row in csv.DictReader(f)]  # fmt: skip


# ----------------------------------------------------------------------------- the contract kit


class _JsonFactory:
    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def __call__(self) -> JsonSink:
        self.buffer = io.BytesIO()
        return JsonSink(self.buffer)

    def read_back(self, _: Any) -> list[dict[str, Any]]:
        return _lines(self.buffer)


def _diagnostic_rows(sink: DiagnosticSink) -> list[dict[str, Any]]:
    assert sink.path is not None
    return [json.loads(line) for line in sink.path.read_text().splitlines()]


def _memory_rows(sink: MemorySink) -> list[dict[str, Any]]:
    return [{"event": r.event, **r.fields()} for r in sink.records]


class _CsvFactory:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path, self.n = tmp_path, 0

    def __call__(self) -> CsvSink:
        return CsvSink()  # <run dir>/steps.csv: a resumed attempt appends to it


def _contract_cases(tmp_path: Path) -> dict[str, tuple[Callable[[], Any], Any]]:
    js = _JsonFactory()
    cs = _CsvFactory(tmp_path)
    return {
        "json": (js, js.read_back),
        "diagnostic": (DiagnosticSink, _diagnostic_rows),
        "prometheus": (lambda: PrometheusSink(port=0), None),
        "memory": (MemorySink, _memory_rows),
        "csv-example": (cs, _csv_rows),
    }


_WRITES = {"csv-example": {"train.step"}}


_NOTHING_KEPT = {"json", "memory"}
"""Sinks that keep nothing across processes: no resume to check."""


@pytest.mark.parametrize("case", ["json", "diagnostic", "prometheus", "memory", "csv-example"])
def test_every_project_sink_passes_the_contract(tmp_path: Path, case: str) -> None:
    factory, read_back = _contract_cases(tmp_path)[case]
    resume = case not in _NOTHING_KEPT
    ranks = "all" if case == "csv-example" else "zero"  # a file per rank: the example names it by rank
    results = check_sink(
        factory, read_back=read_back, events=_WRITES.get(case), base_dir=tmp_path, resume=resume, ranks=ranks
    )
    assert len(results) == 3 if resume else 2
    for result in results[:2]:
        events = [r.event for r in result.records]
        assert events[0] == "run.start" and events[-1] == "run.end"
        assert events.count("train.step") == 6 and events.count("train.batch") == 14
        if read_back is not None:
            expected = 6 if case == "csv-example" else len(events)
            assert len(result.rows) == expected
    if resume and read_back is not None:  # both attempts' rows: 3 steps each
        resumed = results[2]
        assert [r.event for r in resumed.records].count("train.step") == 3
        steps = [row["step"] for row in resumed.rows if row["event"] == "train.step"]
        assert steps == [1, 2, 3, 4, 5, 6]


def test_prometheus_serves_the_last_records_of_the_contract_run(tmp_path: Path) -> None:
    result = check_sink(lambda: PrometheusSink(port=0), base_dir=tmp_path, resume=False)[0]
    step = [r for r in result.records if r.event == "train.step"][-1]
    text = generate_latest(result.sink.registry).decode()
    assert f"traintel_step_loss {step.loss!r}\n" in text  # type: ignore[attr-defined]


class _Mutating(MemorySink):
    def emit(self, record: Record) -> None:
        record.loss = 0.0  # type: ignore[attr-defined]


class _Dropping(MemorySink):
    def emit(self, record: Record) -> None:
        if record.event != "train.batch":
            super().emit(record)


class _CloseTwiceFails(MemorySink):
    def close(self) -> None:
        super().close()
        if self.closed > 1:
            raise RuntimeError("already closed")


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (_Mutating, r"the sink raised 26 time\(s\) during the run"),
        (_Dropping, r"read_back holds 0 train\.batch rows, but the run produced 14 such records"),
        (_CloseTwiceFails, r"a second close\(\) raised RuntimeError: already closed"),
        (
            object,
            r"check_sink: the factory returned object, not a sink: it lacks open\(\), emit\(\)",
        ),
    ],
    ids=["mutates-records", "drops-records", "close-not-idempotent", "not-a-sink"],
)
def test_check_sink_catches_broken_sinks(tmp_path: Path, factory: Callable[[], Any], message: str) -> None:
    from traintel.errors import ConfigError

    with pytest.raises((SinkContractError, ConfigError), match=message):
        check_sink(factory, read_back=_memory_rows, base_dir=tmp_path)


def test_records_cannot_be_mutated_by_a_sink(tmp_path: Path) -> None:
    seen: list[BaseException] = []

    class Attempt(MemorySink):
        def emit(self, record: Record) -> None:
            attempts = (
                lambda: setattr(record, "run_id", "other"),
                lambda: record.diagnostics.__setitem__("k", 1),
            )
            for change in attempts:
                try:
                    change()
                except (dataclasses.FrozenInstanceError, AttributeError, TypeError) as exc:
                    seen.append(exc)

    mem = MemorySink()
    build(quiet_config(tmp_path), Task(model=make_model(), loss_fn=_mse, train_loader=make_batches([4])),
          sinks=[Attempt("attempt"), mem]).run()  # fmt: skip
    assert len(mem.records) == 5
    assert len(seen) == 10  # every attempt on every record raised
    assert [type(e) for e in seen[:2]] == [dataclasses.FrozenInstanceError, AttributeError]
    assert all(r.run_id == "test-run" for r in mem.records)


def _mse(out: Any, y: Any) -> Any:
    import torch

    return torch.nn.functional.mse_loss(out, y)


def test_a_failing_plugin_is_isolated_counted_and_reported_once(tmp_path: Path) -> None:
    class Flaky(MemorySink):
        def emit(self, record: Record) -> None:
            if record.event == "train.step":
                raise OSError("remote store unavailable")
            super().emit(record)

    cfg = quiet_config(tmp_path, accumulation_steps=3, max_epochs=2)
    cfg["sinks"]["prometheus"] = {"enabled": True, "port": 0}
    mem = MemorySink()
    run = build(cfg, Task(model=make_model(), loss_fn=_mse, train_loader=make_batches([4] * 7)),
                sinks=[Flaky("flaky"), mem])  # fmt: skip
    end = run.run()
    assert end.status == "completed"
    assert run.fanout.errors == {"prometheus": 0, "flaky": 6, "memory": 0}
    errors = mem.of("sink.error")
    assert [(e.sink, e.error) for e in errors] == [("flaky", "OSError: remote store unavailable")]  # type: ignore[attr-defined]
    assert len(mem.of("train.step")) == 6
    assert run.prometheus is not None
    text = generate_latest(run.prometheus.registry).decode()
    assert 'traintel_sink_errors_total{sink="flaky"} 6.0\n' in text


# ----------------------------------------------------------------------------- discovery and the CLI

pytestmark_slow = pytest.mark.slow


@pytest.mark.slow
def test_sinks_list_shows_built_in_and_installed_sinks(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "sinks", "list")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        "NAME         SOURCE             TARGET                                         NOTE\n"
        "json         built-in           traintel.sinks.json.sink:JsonSink              structlog JSON lines on stdout (sinks.json)\n"
        "diagnostic   built-in           traintel.sinks.diagnostic:DiagnosticSink       <run dir>/diagnostic.jsonl (sinks.diagnostic)\n"
        "prometheus   built-in           traintel.sinks.prometheus.sink:PrometheusSink  HTTP /metrics exporter (sinks.prometheus)\n"
        "memory       built-in           traintel.sinks.memory:MemorySink               keeps records in memory (Python API and tests)\n"
        "csv          traintel-csv-sink  traintel_csv_sink:CsvSink                      enable with sinks.extra: [{name: csv}]\n"
        "mlflow       traintel           traintel.sinks.mlflow:MlflowSink               enable with sinks.extra: [{name: mlflow}]\n"
        "tensorboard  traintel           traintel.sinks.tensorboard:TensorBoardSink     enable with sinks.extra: [{name: tensorboard}]\n"
    )  # fmt: skip


@pytest.mark.slow
def test_an_entry_point_sink_enabled_by_name_writes_the_values_of_the_json_log(tmp_path: Path) -> None:
    proc = _cli(
        tmp_path, "train", "--config", str(CONFIG), "--set", f"run.dir={tmp_path / 'run'}",
        "--set", "trainer.max_epochs=2", "--set", "sinks.prometheus.port=0", "--set", "sinks.extra=[{name: csv}]",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    steps = [r for r in map(json.loads, proc.stdout.splitlines()) if r["event"] == "train.step"]
    with (tmp_path / "run" / "steps.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(steps) == 22
    for row, step in zip(rows, steps, strict=True):
        assert (int(row["step"]), int(row["epoch"]), int(row["items"])) == (
            step["step"],
            step["epoch"],
            step["items"],
        )
        assert (float(row["loss"]), float(row["lr"])) == (step["loss"], step["lr"])


_PLUGINS = """
from traintel.sinks import MemorySink

def make(**params):
    return MemorySink("by-path")

def explode(**params):
    raise RuntimeError("no credentials for the metrics store")

def not_a_sink():
    return [1, 2]

class CannotOpen(MemorySink):
    def open(self, context):
        raise PermissionError("read-only bucket")

def cannot_open():
    return CannotOpen("bucket")
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[{name: nosuch}]", "sinks.extra[0].name: no sink plugin named 'nosuch' (installed: csv, mlflow, tensorboard)"),
        ("[{factory: 'nomodule:make'}]",
         "sinks.extra[0].factory: cannot import module 'nomodule' (ModuleNotFoundError: No module named 'nomodule')"),
        ("[{factory: 'plugins:nothing'}]", "sinks.extra[0].factory: module 'plugins' has no attribute 'nothing'"),
        ("[{factory: 'plugins:explode'}]",
         "sinks.extra[0]: plugins:explode raised RuntimeError: no credentials for the metrics store"),
        ("[{factory: 'plugins:not_a_sink'}]",
         "sinks.extra[0]: plugins:not_a_sink returned list, not a sink: it lacks open(), emit(), close(), a name"),
        ("[{factory: 'plugins:not_a_sink', params: {x: 1}}]",
         "sinks.extra[0].params: plugins:not_a_sink raised TypeError: not_a_sink() got an unexpected keyword "
         "argument 'x'"),
        ("[{params: {}}]",
         "sinks.extra[0]: give exactly one of name (an installed entry point) or factory (module:function)"),
        ("[{name: csv, factory: 'plugins:make'}]",
         "sinks.extra[0]: give exactly one of name (an installed entry point) or factory (module:function)"),
        ("[{name: csv}, {name: csv}]", "sinks.extra: sink names must be unique; ['csv'] appear more than once"),
        ("[{factory: 'plugins:cannot_open'}]", "sink 'bucket': failed to open: PermissionError: read-only bucket"),
        ("[{name: csv, colour: red}]", "sinks.extra[0].colour: unknown key"),
    ],
    ids=["unknown-name", "unimportable", "no-attribute", "factory-raises", "not-a-sink", "bad-params",
         "neither", "both", "duplicate", "open-fails", "unknown-key"],
)  # fmt: skip
def test_bad_plugin_input_exits_2_before_training(tmp_path: Path, extra: str, message: str) -> None:
    proc = _cli(
        tmp_path, "train", "--set", "sinks.prometheus.port=0", "--set", f"sinks.extra={extra}",
        files={"plugins.py": _PLUGINS},
    )  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"traintel: error: {message}\n")
    assert not (tmp_path / "runs").exists()


def test_a_plugin_by_import_path_receives_every_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "plugins.py").write_text(_PLUGINS)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = quiet_config(tmp_path, accumulation_steps=2)
    cfg["sinks"]["extra"] = [{"factory": "plugins:make"}]
    mem = MemorySink()
    run = build(cfg, Task(model=make_model(), loss_fn=_mse, train_loader=make_batches([4] * 4)), sinks=[mem])
    run.run()
    (plugin,) = [s for s in run.fanout.sinks if s.name == "by-path"]
    assert isinstance(plugin, MemorySink)
    assert plugin.records == mem.records and len(mem.records) == 9
    assert isinstance(plugin.context, RunContext) and plugin.context.run_id == "test-run"


class _RowsFile:
    """A file sink of ``train.step`` rows (JSON lines) that opens its file as ``mode`` says."""

    name = "rows"

    def __init__(self, mode: str = "a") -> None:
        self.mode, self.path, self._file = mode, None, None

    def open(self, context: Any) -> None:
        self.path = context.run_dir / "rows.jsonl"
        self._file = self.path.open(self.mode, buffering=1)

    def emit(self, record: Record) -> None:
        if record.event == "train.step" and self._file is not None:
            self._file.write(
                json.dumps({"event": record.event, "step": record.step, "loss": record.loss}) + "\n"
            )  # type: ignore[attr-defined]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _rows_file(sink: _RowsFile) -> list[dict[str, Any]]:
    assert sink.path is not None
    return [json.loads(line) for line in sink.path.read_text().splitlines()]


class _Blocking(MemorySink):
    """A back-end that takes 0.3 s for the first step record."""

    def emit(self, record: Record) -> None:
        if record.event == "train.step" and not self.of("train.step"):
            time.sleep(0.3)
        super().emit(record)


class _BlockingThreaded(_Blocking):
    threaded = True


def test_check_sink_catches_a_sink_that_overwrites_on_resume_or_blocks(tmp_path: Path) -> None:
    steps = {"train.step"}
    check_sink(_RowsFile, read_back=_rows_file, events=steps, base_dir=tmp_path / "a", ranks="zero")
    with pytest.raises(SinkContractError) as overwrote:
        check_sink(lambda: _RowsFile("w"), read_back=_rows_file, events=steps, base_dir=tmp_path / "w")
    assert str(overwrote.value) == (
        "after a resume (attempt 1 in attempt 0's run directory), read_back holds 3 train.step rows, but the "
        "run produced 6 such records; did open() overwrite?"
    )
    with pytest.raises(SinkContractError) as beside:  # two ranks, one file opened with "x"
        check_sink(lambda: _RowsFile("x"), read_back=_rows_file, events=steps, base_dir=tmp_path / "x",
                   resume=False, ranks="all")  # fmt: skip
    assert str(beside.value) == (
        f"rank 1's sink could not be opened beside rank 0's: FileExistsError: [Errno 17] File exists: "
        f"'{tmp_path / 'x' / 'sink-contract-ranks' / 'rows.jsonl'}'"
    )
    with pytest.raises(SinkContractError, match=r"^a delivery took 0\.\d\d s on the training thread \(the bound is "
                       r"0\.25 s\): training waits for it; deliver on a thread of its own \(threaded\)$"):  # fmt: skip
        check_sink(_Blocking, read_back=_memory_rows, base_dir=tmp_path / "b", resume=False)
    check_sink(_BlockingThreaded, read_back=_memory_rows, base_dir=tmp_path / "t", resume=False)
