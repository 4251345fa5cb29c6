"""The TensorBoard sink: event files read back with TensorBoard's own reader match the records.

TensorBoard scalar summaries hold float32 values and float64 wall times, so every check
here is exact after rounding the record's float64 value to float32, never approximate.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers.lines import strict_object
from tests.helpers.paths import ROOT
from tests.helpers.runs import quiet_config
from tests.helpers.tasks import make_batches, make_model
from traintel.errors import ConfigError
from traintel.records import Record, RunStartRecord, SinkErrorRecord
from traintel.sinks.base import RunContext
from traintel.sinks.memory import MemorySink
from traintel.sinks.tensorboard import TensorBoardSink
from traintel.task import Task
from traintel.testing import (
    batch_record,
    check_sink,
    end_record,
    epoch_record,
    eval_record,
    run_context,
    step_record,
)

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

# The spec, restated independently of the sink: event -> (tag, record field) pairs.
TAGS: dict[str, list[tuple[str, str]]] = {
    "train.batch": [
        ("train/batch_loss", "loss"),
        ("train/batch_raw_loss", "raw_loss"),
        ("train/batch_loss_scale", "loss_scale"),
    ],
    "train.step": [
        ("train/step_loss", "loss"),
        ("train/lr", "lr"),
        ("train/grad_norm", "grad_norm"),
        ("train/grad_scale", "grad_scale"),
    ],
    "train.epoch": [("train/epoch_loss", "loss")],
    "eval.epoch": [("eval/loss", "loss")],
}
ALL_TAGS = {tag for pairs in TAGS.values() for tag, _ in pairs}
OPTIONAL = {"grad_norm", "grad_scale"}
"""Fields whose tag is written only when the record holds a value (not null)."""

Point = tuple[int, Any, float]
"""(step, value, wall_time); value is a float, or "nan" so that NaN compares equal to itself."""


def _f32(value: float) -> Any:
    """The float32 TensorBoard stores for a float64 value, widened back; NaN as "nan"."""
    if math.isnan(value):
        return "nan"
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def _x(row: Mapping[str, Any]) -> int:
    """The optimizer-step axis: a micro-batch's gradient goes into step + 1."""
    step = int(row["step"])
    return step + 1 if row["event"] == "train.batch" else step


def _as_row(record: Record) -> dict[str, Any]:
    return {"event": record.event, **record.fields(), "time": record.time}


def _expected(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[Point]]:
    """What the event files must hold, per tag, for these records (or record-like rows)."""
    out: dict[str, list[Point]] = {}
    for row in rows:
        for tag, name in TAGS.get(row["event"], []):
            if row[name] is not None:
                out.setdefault(tag, []).append((_x(row), _f32(row[name]), row.get("time", math.nan)))
    return out


def _read(log_dir: Path) -> dict[str, list[Point]]:
    """Every scalar in ``log_dir``, per tag, with TensorBoard's own reader (keep all points)."""
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, list[Point]] = {}
    for tag in acc.Tags()["scalars"]:
        points = []
        for e in acc.Scalars(tag):
            value = "nan" if math.isnan(e.value) else e.value
            assert value == "nan" or value == _f32(value), "a scalar not stored as float32"
            points.append((e.step, value, e.wall_time))
        out[tag] = points
    return out


def _without_time(scalars: Mapping[str, list[Point]]) -> dict[str, list[tuple[int, Any]]]:
    return {tag: [(s, v) for s, v, _ in points] for tag, points in scalars.items()}


def _read_back(sink: TensorBoardSink) -> list[dict[str, Any]]:
    """Rows for check_sink: ``step`` (an int, compared exactly by the kit) with the float32
    values under ``*_f32`` keys, which the kit does not compare with the float64 fields."""
    assert sink.log_dir is not None
    scalars = _read(sink.log_dir)
    rows: list[dict[str, Any]] = []
    for event, pairs in TAGS.items():
        columns = [scalars.get(tag, []) for tag, name in pairs if name not in OPTIONAL]
        names = [name for _, name in pairs if name not in OPTIONAL]
        assert len({len(c) for c in columns}) == 1, f"{event}: tags with different point counts"
        for points in zip(*columns, strict=True):
            step = points[0][0] - 1 if event == "train.batch" else points[0][0]
            row: dict[str, Any] = {"event": event, "step": step, "wall_time": points[0][2]}
            row.update({f"{name}_f32": p[1] for name, p in zip(names, points, strict=True)})
            rows.append(row)
    return rows


# (a) the contract kit, with the event files read back


def test_contract_and_event_files_match_the_records_after_float32_rounding(tmp_path: Path) -> None:
    results = check_sink(TensorBoardSink, read_back=_read_back, events=set(TAGS), base_dir=tmp_path)

    assert len(results) == 3  # two runs, then a resumed attempt whose event files join the first's
    for result in results[:2]:
        sink = result.sink
        assert sink.log_dir == result.run_dir / "tensorboard"
        scalars = _read(sink.log_dir)
        expected = _expected(_as_row(r) for r in result.records)
        assert set(scalars) == ALL_TAGS - {"train/grad_scale"} == set(expected)  # no fp16 in the kit's runs
        # per tag, in order: (step axis, float32(value), record.time); wall times exactly
        assert scalars == expected

        records = {e: [r for r in result.records if r.event == e] for e in TAGS}
        assert all(records.values())
        for row in result.rows:
            record = records[row["event"]].pop(0)
            assert row["wall_time"] == record.time
            for key, value in row.items():
                if key.endswith("_f32"):
                    assert value == _f32(getattr(record, key.removesuffix("_f32")))
        assert not any(records.values()), "records not written"

        # the check is not vacuous: float32 rounding changes some values (lr 0.05, n_b/N_t)
        floats = [v for r in result.records for _, n in TAGS.get(r.event, []) if (v := getattr(r, n))]
        assert any(_f32(v) != v for v in floats)


# (b) and (c): a run through the public API, the sink enabled by its entry-point name


def test_run_via_entry_point_matches_memory_sink_and_diagnostic_file(tmp_path: Path) -> None:
    from traintel.run.api import build

    cfg = quiet_config(tmp_path, max_epochs=2, accumulation_steps=2, grad_clip_norm=1.0)
    cfg["sinks"]["diagnostic"] = {"enabled": True}
    cfg["sinks"]["extra"] = [{"name": "tensorboard", "params": {"log_dir": str(tmp_path / "tb")}}]
    task = Task(
        model=make_model(),
        loss_fn=torch.nn.functional.mse_loss,
        train_loader=make_batches([4, 4, 3, 2, 5]),
        val_loader=make_batches([3, 3], seed=1),
    )
    mem = MemorySink()
    end = build(cfg, task, sinks=[mem]).run()
    assert end.status == "completed"

    scalars = _read(tmp_path / "tb")
    steps = mem.of("train.step")
    assert len(steps) == 6
    assert [(s, v) for s, v, _ in scalars["train/step_loss"]] == [(r.step, _f32(r.loss)) for r in steps]
    assert any(_f32(r.loss) != r.loss for r in steps), "float64 losses should not be float32-exact"
    assert scalars == _expected(_as_row(r) for r in mem.records)

    diag = [strict_object(line) for line in (tmp_path / "run" / "diagnostic.jsonl").read_text().splitlines()]
    diag_steps = [d for d in diag if d["event"] == "train.step"]
    assert [d["loss"] for d in diag_steps] == [r.loss for r in steps]  # float64, exact
    assert [(d["step"], _f32(d["loss"])) for d in diag_steps] == [
        (s, v) for s, v, _ in scalars["train/step_loss"]
    ]
    assert _without_time(_expected(diag)) == _without_time(scalars)


# the sink on its own


def _context(tmp_path: Path) -> RunContext:
    return run_context(tmp_path / "run")


def test_non_finite_values_and_skipped_records(tmp_path: Path) -> None:
    records: list[Record] = [
        RunStartRecord(
            run_id="r1",
            time=1.0,
            name="n",
            run_dir="d",
            device="cpu",
            config={},
            metrics_url=None,
            optimizer="torch.optim.sgd.SGD",
        ),
        batch_record(time=2.25, batch=1, raw_loss=math.nan, loss=math.inf, loss_scale=0.1),
        batch_record(time=2.5, batch=2, raw_loss=-math.inf, loss=0.1, loss_scale=0.5),
        SinkErrorRecord(run_id="r1", time=2.75, sink="x", error="boom"),
        step_record(time=3.125, loss=math.nan),
        epoch_record(time=4.0, loss=math.inf),
        eval_record(time=5.0, loss=-math.inf),
        end_record(time=6.0),
    ]
    sink = TensorBoardSink()
    sink.open(_context(tmp_path))
    for record in records:
        sink.emit(record)
    sink.close()

    assert sink.log_dir == tmp_path / "run" / "tensorboard"
    scalars = _read(sink.log_dir)
    assert scalars == {
        "train/batch_raw_loss": [(1, "nan", 2.25), (1, -math.inf, 2.5)],
        "train/batch_loss": [(1, math.inf, 2.25), (1, _f32(0.1), 2.5)],
        "train/batch_loss_scale": [(1, _f32(0.1), 2.25), (1, 0.5, 2.5)],
        "train/step_loss": [(1, "nan", 3.125)],
        "train/lr": [(1, _f32(1e-3), 3.125)],
        "train/epoch_loss": [(1, math.inf, 4.0)],
        "eval/loss": [(1, -math.inf, 5.0)],
    }
    assert scalars == _expected(_as_row(r) for r in records)


def test_the_grad_scale_is_written_only_when_a_step_has_one(tmp_path: Path) -> None:
    records = [step_record(time=2.0), step_record(time=3.0, step=2, grad_scale=65536.0)]
    sink = TensorBoardSink()
    sink.open(_context(tmp_path))
    for record in records:
        sink.emit(record)
    sink.close()

    assert sink.log_dir is not None
    scalars = _read(sink.log_dir)
    assert scalars["train/grad_scale"] == [(2, 65536.0, 3.0)]
    assert scalars == _expected(_as_row(r) for r in records)


def test_lifecycle_errors_and_idempotent_close(tmp_path: Path) -> None:
    sink = TensorBoardSink(log_dir=str(tmp_path / "tb"), flush_secs=0.5)
    assert sink.name == "tensorboard"
    sink.close()  # before open: harmless
    record = eval_record(time=1.0, loss=0.5)
    with pytest.raises(RuntimeError, match="before open"):
        sink.emit(record)
    sink.open(_context(tmp_path))
    assert sink.log_dir == tmp_path / "tb"
    assert not (tmp_path / "run").exists()
    sink.emit(record)
    sink.close()
    sink.close()
    with pytest.raises(RuntimeError):
        sink.emit(record)
    assert _read(tmp_path / "tb") == {"eval/loss": [(1, 0.5, 1.0)]}


@pytest.mark.parametrize("flush_secs", [0, -1.0])
def test_bad_flush_secs_is_a_config_error(tmp_path: Path, flush_secs: float) -> None:
    from traintel.run.api import build

    cfg = quiet_config(tmp_path)
    cfg["sinks"]["extra"] = [{"name": "tensorboard", "params": {"flush_secs": flush_secs}}]
    task = Task(model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches([2]))
    with pytest.raises(ConfigError, match="flush_secs") as info:
        build(cfg, task).run()
    assert info.value.key == "sinks.extra[0]"


def test_missing_tensorboard_is_a_config_error_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    sink = TensorBoardSink()
    with pytest.raises(ConfigError) as info:
        sink.open(_context(tmp_path))
    assert (info.value.key, info.value.problem) == (
        "sinks.extra",
        "the tensorboard sink needs `pip install traintel[tensorboard]`",
    )
    assert not (tmp_path / "run").exists()


def test_module_imports_without_tensorboard() -> None:
    code = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorboard" or name.startswith(("tensorboard.", "torch.utils.tensorboard")):
            raise ModuleNotFoundError(name)
        return None

sys.meta_path.insert(0, Block())
from traintel.sinks.tensorboard import TensorBoardSink
assert not any("tensorboard" in m for m in sys.modules if m != "traintel.sinks.tensorboard")
sink = TensorBoardSink(log_dir="unused")
print(sink.name)
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert out.stdout == "tensorboard\n", out.stderr
