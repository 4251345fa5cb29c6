"""The ``checkpoint`` record on the exporter: the newest checkpoint of each reason as the
``traintel_checkpoint_*`` gauges, labelled ``reason``, read over a real HTTP scrape. None before the
first checkpoint; a newer one of the same reason replaces its values; a best checkpoint has series of
its own beside the periodic ones; the run's progress gauges stay the steps'."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from traintel.records import CheckpointRecord
from traintel.sinks import PrometheusSink
from traintel.testing import T0, end_record, run_context, step_record


def _checkpoint(**overrides: Any) -> CheckpointRecord:
    """A periodic checkpoint of step 40 (epoch 4), 123456789 bytes, written in 1.5 s with training
    waiting 0.375 s, four seconds after ``T0``."""
    fields: dict[str, Any] = {
        "run_id": "r1", "time": T0 + 4, "step": 40, "epoch": 4, "reason": "every_steps",
        "size_bytes": 123_456_789, "write_seconds": 1.5, "stall_seconds": 0.375, "background": True,
    }  # fmt: skip
    return CheckpointRecord(**{**fields, **overrides})


HELP = {
    "step": "Optimizer step the newest checkpoint holds, by reason.",
    "size_bytes": "Bytes of the newest checkpoint, all ranks' parts together, by reason.",
    "write_seconds": "Seconds from the start of the newest checkpoint until this rank's part was on disk, "
    "by reason.",
    "stall_seconds": "Seconds training waited on this rank for the newest checkpoint, by reason.",
    "timestamp_seconds": "Unix time the newest checkpoint was complete on every rank, by reason.",
}


def _families(samples: dict[str, list[str]]) -> str:
    """The exposition text of the five families, each with its samples (lines after the name)."""
    return "".join(
        f"# HELP traintel_checkpoint_{name} {help_}\n# TYPE traintel_checkpoint_{name} gauge\n"
        + "".join(f"traintel_checkpoint_{name}{line}\n" for line in samples[name])
        for name, help_ in HELP.items()
    )


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[PrometheusSink]:
    sink = PrometheusSink(port=0)
    sink.open(run_context(tmp_path))
    try:
        yield sink
    finally:
        sink.close()


def _scrape(sink: PrometheusSink, prefix: str = "traintel_checkpoint_") -> str:
    """The lines of a real scrape that name a family starting with ``prefix``, in the order served."""
    assert sink.url is not None
    with urllib.request.urlopen(sink.url, timeout=5) as response:
        body = response.read().decode()
    return "".join(line + "\n" for line in body.splitlines() if prefix in line)


def test_no_checkpoint_family_before_the_first_checkpoint(sink: PrometheusSink) -> None:
    sink.emit(step_record())
    assert _scrape(sink, "traintel_") != ""  # served, with the step's families
    assert _scrape(sink) == ""


def test_a_checkpoint_is_served_as_exactly_these_lines(sink: PrometheusSink) -> None:
    sink.emit_many([step_record(), _checkpoint()])
    assert _scrape(sink) == (
        "# HELP traintel_checkpoint_step Optimizer step the newest checkpoint holds, by reason.\n"
        "# TYPE traintel_checkpoint_step gauge\n"
        'traintel_checkpoint_step{reason="every_steps"} 40.0\n'
        "# HELP traintel_checkpoint_size_bytes Bytes of the newest checkpoint, all ranks' parts together, "
        "by reason.\n"
        "# TYPE traintel_checkpoint_size_bytes gauge\n"
        'traintel_checkpoint_size_bytes{reason="every_steps"} 1.23456789e+08\n'
        "# HELP traintel_checkpoint_write_seconds Seconds from the start of the newest checkpoint until this "
        "rank's part was on disk, by reason.\n"
        "# TYPE traintel_checkpoint_write_seconds gauge\n"
        'traintel_checkpoint_write_seconds{reason="every_steps"} 1.5\n'
        "# HELP traintel_checkpoint_stall_seconds Seconds training waited on this rank for the newest "
        "checkpoint, by reason.\n"
        "# TYPE traintel_checkpoint_stall_seconds gauge\n"
        'traintel_checkpoint_stall_seconds{reason="every_steps"} 0.375\n'
        "# HELP traintel_checkpoint_timestamp_seconds Unix time the newest checkpoint was complete on every "
        "rank, by reason.\n"
        "# TYPE traintel_checkpoint_timestamp_seconds gauge\n"
        'traintel_checkpoint_timestamp_seconds{reason="every_steps"} 1.76400000425e+09\n'
    )


def test_a_newer_checkpoint_replaces_the_values_of_its_reason(sink: PrometheusSink) -> None:
    sink.emit(_checkpoint())
    sink.emit(
        _checkpoint(time=T0 + 9, step=80, epoch=8, size_bytes=123_456_790, write_seconds=2.0625,
                    stall_seconds=0.5)
    )  # fmt: skip
    reason = '{reason="every_steps"} '
    assert _scrape(sink) == _families({
        "step": [reason + "80.0"],
        "size_bytes": [reason + "1.2345679e+08"],
        "write_seconds": [reason + "2.0625"],
        "stall_seconds": [reason + "0.5"],
        "timestamp_seconds": [reason + "1.76400000925e+09"],
    })  # fmt: skip


def test_a_best_checkpoint_has_series_of_its_own_beside_the_periodic_ones(sink: PrometheusSink) -> None:
    """Each reason keeps its newest checkpoint, in the order first seen: a best checkpoint (which no
    run can resume from) neither hides the newest periodic one nor moves its timestamp."""
    sink.emit_many([
        _checkpoint(),
        _checkpoint(time=T0 + 5, step=44, reason="best", size_bytes=4096, write_seconds=0.25,
                    stall_seconds=0.25, background=False),
        _checkpoint(time=T0 + 9, step=80, epoch=8, write_seconds=2.0625, stall_seconds=0.5),
    ])  # fmt: skip
    periodic, best = '{reason="every_steps"} ', '{reason="best"} '
    assert _scrape(sink) == _families({
        "step": [periodic + "80.0", best + "44.0"],
        "size_bytes": [periodic + "1.23456789e+08", best + "4096.0"],
        "write_seconds": [periodic + "2.0625", best + "0.25"],
        "stall_seconds": [periodic + "0.5", best + "0.25"],
        "timestamp_seconds": [periodic + "1.76400000925e+09", best + "1.76400000525e+09"],
    })  # fmt: skip


def test_a_checkpoint_behind_the_run_leaves_its_progress_alone(sink: PrometheusSink) -> None:
    """A checkpoint written in the background is complete (and its record emitted) after later
    steps: traintel_optimizer_step and traintel_epoch stay those of the newest step."""
    sink.emit_many([step_record(step=47, epoch=5, items_total=564), _checkpoint(step=40, epoch=4)])
    lines = _scrape(sink, "traintel_").splitlines()
    progress = ("traintel_epoch ", "traintel_optimizer_step ", "traintel_checkpoint_step{")
    assert [line for line in lines if line.startswith(progress)] == [
        "traintel_epoch 5.0",
        "traintel_optimizer_step 47.0",
        'traintel_checkpoint_step{reason="every_steps"} 40.0',
    ]


def test_per_rank_labels_them_with_the_rank_and_the_push_carries_them(tmp_path: Path) -> None:
    sink = PrometheusSink(port=0, per_rank=True)
    sink.open(run_context(tmp_path, rank=1, world_size=2))
    try:
        checkpoint = _checkpoint(rank=1, world_size=2, write_seconds=1.75, stall_seconds=1.75,
                                 background=False)  # fmt: skip
        sink.emit_many([checkpoint, end_record(rank=1, world_size=2)])
        labels = '{rank="1",reason="every_steps"} '
        assert _scrape(sink) == _families({
            "step": [labels + "40.0"],
            "size_bytes": [labels + "1.23456789e+08"],
            "write_seconds": [labels + "1.75"],
            "stall_seconds": [labels + "1.75"],
            "timestamp_seconds": [labels + "1.76400000425e+09"],
        })  # fmt: skip
        # what push() sends at run end: the same families, with the same samples
        pushed = {
            sample.name: (sample.labels, sample.value)
            for collector in sink.pushed
            for family in collector.collect()
            for sample in family.samples
            if sample.name.startswith("traintel_checkpoint_")
        }
        assert pushed == {
            f"traintel_checkpoint_{name}": ({"reason": "every_steps", "rank": "1"}, value)
            for name, value in (("step", 40.0), ("size_bytes", 123_456_789.0), ("write_seconds", 1.75),
                                ("stall_seconds", 1.75), ("timestamp_seconds", T0 + 4))
        }  # fmt: skip
    finally:
        sink.close()
