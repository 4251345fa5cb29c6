"""Every consumer reads the same record: what a plug-in sink receives does not depend on which
built-in sinks are on."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import torch

from tests.helpers.runs import quiet_config
from tests.helpers.tasks import make_batches, make_model
from traintel.records import Record
from traintel.run.api import build
from traintel.sinks.memory import MemorySink
from traintel.task import Task


def _records(tmp_path: Path, *, builtins: bool) -> list[Record]:
    cfg = quiet_config(tmp_path / ("on" if builtins else "off"), accumulation_steps=3, max_epochs=2)
    if builtins:
        cfg["sinks"] = {
            "json": {"enabled": True},
            "diagnostic": {"enabled": True},
            "prometheus": {"enabled": True, "port": 0},
        }
    memory = MemorySink()
    task = Task(
        model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches([5, 3, 4] * 3)
    )
    build(cfg, task, sinks=[memory], json_stream=io.BytesIO()).run()
    return list(memory.records)


def _values(record: Record) -> dict[str, Any]:
    """Everything a record holds except what differs between two runs by nature: the clock, the
    process's memory, and run.start's description of the sinks themselves."""
    values = {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name != "time"}
    values["diagnostics"] = {k: v for k, v in record.diagnostics.items() if k != "rss_bytes"}
    for key in ("config", "metrics_url", "run_dir", "duration_seconds", "items_per_second"):
        values.pop(key, None)
    return values


def test_a_plugin_gets_identical_records_with_the_builtin_sinks_on_or_off(tmp_path: Path) -> None:
    off, on = _records(tmp_path, builtins=False), _records(tmp_path, builtins=True)
    assert [r.event for r in off] == [r.event for r in on]
    assert (
        len(off) == 1 + 2 * (9 + 3) + 2 + 1
    )  # run.start, 2 epochs of 9 batch and 3 step records, 2 epochs, run.end
    assert [_values(r) for r in off] == [_values(r) for r in on]
    batch = next(r for r in on if r.event == "train.batch")
    assert set(batch.diagnostics) == {
        "expected_loss_scale", "observed_loss_scale", "scale_ok", "accumulation_position",
        "window_items", "loss_dtype", "rss_bytes",
    }  # fmt: skip
