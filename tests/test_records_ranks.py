"""Every record carries ``rank`` and ``world_size`` (schema 1.1.0), right after ``schema_version``
in a line; ``rank_filename`` names each rank's diagnostic file.

The fields are base-class fields of ``Record`` with defaults (rank 0 of a one-process job), so
constructors written before them keep working; ``layout()`` and ``Record.fields()`` take the
dataclass field order, where base-class fields come first, so every line reads timestamp, level,
event, run_id, schema_version, rank, world_size, attempt (schema 1.2.0), then the event's own fields.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from traintel.records import (
    RECORD_TYPES,
    SCHEMA_VERSION,
    Record,
    RunStartRecord,
    SinkErrorRecord,
    layout,
)
from traintel.run.layout import rank_filename, rank_of_filename
from traintel.schema import validate_lines
from traintel.sinks import LineRenderer
from traintel.sinks.json.lines import ecs_layout
from traintel.testing import T0, make_record

HEAD = ["timestamp", "level", "event", "run_id", "schema_version", "rank", "world_size", "attempt"]


def every_record(**overrides: Any) -> list[Record]:
    """One record of each of the nine events."""
    common = {"run_id": "r1", "time": T0, **overrides}
    built = [make_record(e, **overrides) for e in ("train.batch", "train.step", "train.epoch", "eval.epoch")]
    built.append(make_record("metric", **overrides))
    built.append(make_record("checkpoint", **overrides))
    built.append(make_record("run.end", **overrides))
    built.append(
        RunStartRecord(
            **common,
            name="demo",
            run_dir="runs/r1",
            device="cpu",
            config={},
            metrics_url=None,
            optimizer="torch.optim.sgd.SGD",
        )
    )
    built.append(SinkErrorRecord(**common, sink="flaky", error="OSError: x"))
    assert sorted(r.event for r in built) == sorted(cls.event for cls in RECORD_TYPES)
    return built


def test_schema_version_is_1_5_0() -> None:
    assert SCHEMA_VERSION == "1.5.0"


def test_defaults_are_rank_0_of_a_one_process_job() -> None:
    for record in every_record():
        assert (record.rank, record.world_size) == (0, 1), record.event
    record = make_record("train.batch", rank=3, world_size=4)
    assert (record.rank, record.world_size) == (3, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.rank = 0  # type: ignore[misc]


@pytest.mark.parametrize("cls", RECORD_TYPES, ids=[cls.event for cls in RECORD_TYPES])
def test_rank_and_world_size_come_first_in_every_layout(cls: type[Record]) -> None:
    names, _ = layout(cls)
    assert names[:3] == ("rank", "world_size", "attempt")
    assert not {"rank", "world_size", "attempt"} & set(names[3:])


def test_fields_and_lines_put_them_right_after_schema_version() -> None:
    for record in every_record(rank=1, world_size=2):
        assert list(record.fields())[:5] == ["run_id", "schema_version", "rank", "world_size", "attempt"]
        line = LineRenderer.event_dict(record)
        assert list(line)[:8] == HEAD, record.event
        assert (line["schema_version"], line["rank"], line["world_size"]) == ("1.5.0", 1, 2)


def test_a_rendered_line_of_rank_1_is_exact_and_valid() -> None:
    renderer = LineRenderer()
    records = every_record(rank=1, world_size=2)
    lines = [renderer(None, "info", LineRenderer.event_dict(r)) for r in records]
    assert lines[0] == (
        b'{"timestamp":"2025-11-24T16:00:00.250000Z","level":"info","event":"train.batch",'
        b'"run_id":"r1","schema_version":"1.5.0","rank":1,"world_size":2,"attempt":0,'
        b'"epoch":1,"batch":2,"batches":10,"step":0,"items":4,'
        b'"raw_loss":0.75,"loss":0.25,"loss_scale":0.3333333333333333,"window_size":3}\n'
    )
    assert validate_lines(lines) == 9
    assert [list(json.loads(line))[:8] for line in lines] == [HEAD] * 9


def test_the_ecs_profile_keeps_them_after_the_head() -> None:
    line = ecs_layout(None, "info", LineRenderer.event_dict(make_record("train.step", rank=2, world_size=3)))
    assert list(line)[:11] == [
        "@timestamp", "log.level", "message", "ecs.version", "event.dataset", "event.action",
        "traintel.run_id", "traintel.schema_version", "traintel.rank", "traintel.world_size", "traintel.attempt",
    ]  # fmt: skip
    assert (line["traintel.rank"], line["traintel.world_size"]) == (2, 3)


# ----------------------------------------------------------------------------- rank_filename

NAMES = [
    # (rank 0's name, rank, rank's name)
    ("diagnostic.jsonl", 0, "diagnostic.jsonl"),
    ("diagnostic.jsonl", 1, "diagnostic.rank1.jsonl"),
    ("diagnostic.jsonl", 12, "diagnostic.rank12.jsonl"),
    ("diag.jsonl", 3, "diag.rank3.jsonl"),
    ("run.v2.jsonl", 1, "run.v2.rank1.jsonl"),  # before the last suffix only
    ("diag", 0, "diag"),
    ("diag", 1, "diag.rank1"),  # no suffix: appended
    (".diag", 1, ".diag.rank1"),  # a leading dot starts no suffix
    ("diag.", 1, "diag..rank1"),  # nor does a trailing one
]


@pytest.mark.parametrize(("filename", "rank", "expected"), NAMES)
def test_rank_filename(filename: str, rank: int, expected: str) -> None:
    assert rank_filename(filename, rank) == expected
    assert rank_of_filename(expected, filename) == (rank or None)


@pytest.mark.parametrize("rank", [-1, True, 1.0, "1"])
def test_rank_filename_rejects_what_is_no_rank(rank: Any) -> None:
    with pytest.raises(ValueError, match=r"^rank must be an int >= 0, got "):
        rank_filename("diagnostic.jsonl", rank)


@pytest.mark.parametrize(
    "name",
    [
        "diagnostic.jsonl",
        "diagnostic.rank0.jsonl",
        "diagnostic.rank01.jsonl",
        "diagnostic.rank.jsonl",
        "diagnostic.rank-1.jsonl",
        "diagnostic.rank1.json",
        "diagnostic.rank1.jsonl.1",  # a rotated part of rank 1's file, not the file
        "diagnostic.jsonl.rank1",
        "diagnostic.rank\u0661.jsonl",  # ARABIC-INDIC DIGIT ONE: decimal, not ASCII
        "other.rank1.jsonl",
    ],
)
def test_rank_of_filename_is_none_for_other_names(name: str) -> None:
    assert rank_of_filename(name, "diagnostic.jsonl") is None
