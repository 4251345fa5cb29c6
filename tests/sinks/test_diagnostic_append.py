"""A resumed attempt appends to its run's diagnostic file; the first attempt still creates it exclusively.

``cut_torn_tail`` removes what follows the last newline (a line torn by ``kill -9``), so the resumed
attempt's first line never glues onto a partial one; rotation counts the bytes already in the file;
a resumed attempt that writes nothing keeps the earlier attempts' file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from traintel.errors import EXIT_BAD_INPUT, ConfigError
from traintel.records import Record
from traintel.run.layout import rank_filename
from traintel.schema import parse_line, validate_line
from traintel.sinks import DiagnosticSink
from traintel.sinks.diagnostic import cut_torn_tail
from traintel.testing import T0, batch_record, end_record, run_context, step_record

OLD_BATCH = (
    b'{"timestamp":"2025-11-24T16:00:00.250000Z","level":"info","event":"train.batch","run_id":"r1",'
    b'"schema_version":"1.5.0","rank":0,"world_size":1,"attempt":0,"epoch":1,"batch":2,"batches":10,'
    b'"step":0,"items":4,"raw_loss":0.75,"loss":0.25,"loss_scale":0.3333333333333333,"window_size":3}\n'
)
OLD_STEP = (
    b'{"timestamp":"2025-11-24T16:00:01.250000Z","level":"info","event":"train.step","run_id":"r1",'
    b'"schema_version":"1.5.0","rank":0,"world_size":1,"attempt":0,"epoch":1,"step":1,"items":12,'
    b'"items_total":12,"window_size":3,"loss":0.6875,"lr":0.001,"grad_norm":null,"skipped":false,'
    b'"grad_scale":null,"metrics":{}}\n'
)
TORN = b'{"timestamp":"2025-11-24T16:00:02.250000Z","level":"info","event":"train.ba'
"""The start of a line a ``kill -9`` cut short."""
NEW_BATCH = (
    b'{"timestamp":"2025-11-24T16:00:10.250000Z","level":"info","event":"train.batch","run_id":"r1",'
    b'"schema_version":"1.5.0","rank":0,"world_size":1,"attempt":1,"epoch":1,"batch":3,"batches":10,'
    b'"step":1,"items":4,"raw_loss":0.75,"loss":0.25,"loss_scale":0.3333333333333333,"window_size":3}\n'
)
NEW_STEP = (
    b'{"timestamp":"2025-11-24T16:00:11.250000Z","level":"info","event":"train.step","run_id":"r1",'
    b'"schema_version":"1.5.0","rank":0,"world_size":1,"attempt":1,"epoch":1,"step":2,"items":12,'
    b'"items_total":24,"window_size":3,"loss":0.6875,"lr":0.001,"grad_norm":null,"skipped":false,'
    b'"grad_scale":null,"metrics":{}}\n'
)
NEW_END = (
    b'{"timestamp":"2025-11-24T16:00:12.250000Z","level":"info","event":"run.end","run_id":"r1",'
    b'"schema_version":"1.5.0","rank":0,"world_size":1,"attempt":1,"status":"completed",'
    b'"reason":"max_epochs","epoch":1,"step":2,"items_total":24,"duration_seconds":3.0}\n'
)


def _resumed_records(**overrides: Any) -> list[Record]:
    """The resumed attempt's records, rendering to NEW_BATCH, NEW_STEP and NEW_END (rank 0)."""
    return [
        batch_record(time=T0 + 10, attempt=1, batch=3, step=1, **overrides),
        step_record(time=T0 + 11, attempt=1, step=2, items_total=24, **overrides),
        end_record(time=T0 + 12, attempt=1, step=2, items_total=24, **overrides),
    ]


def _resume(run_dir: Path, sink: DiagnosticSink | None = None, **context: Any) -> DiagnosticSink:
    """Open ``sink`` as attempt 1 in ``run_dir``, emit the resumed records, close it."""
    sink = sink if sink is not None else DiagnosticSink()
    sink.open(run_context(run_dir, attempt=1, **context))
    for record in _resumed_records(**{k: v for k, v in context.items() if k in {"rank", "world_size"}}):
        sink.emit(record)
    sink.close()
    return sink


# ----------------------------------------------------------------------------- cut_torn_tail


@pytest.mark.parametrize(
    ("content", "removed", "kept"),
    [
        (OLD_BATCH + OLD_STEP, 0, OLD_BATCH + OLD_STEP),
        (OLD_BATCH + OLD_STEP + TORN, len(TORN), OLD_BATCH + OLD_STEP),
        (b"", 0, b""),
        (TORN, len(TORN), b""),
        (b"\n", 0, b"\n"),
        (b"a\n" + b"y" * 200_000, 200_000, b"a\n"),  # a tail longer than one backward read
        (b"y" * 150_000, 150_000, b""),
    ],
    ids=[
        "ends-with-newline",
        "torn-tail",
        "empty",
        "no-newline",
        "only-a-newline",
        "long-tail",
        "long-no-newline",
    ],
)
def test_cut_torn_tail(tmp_path: Path, content: bytes, removed: int, kept: bytes) -> None:
    path = tmp_path / "diagnostic.jsonl"
    path.write_bytes(content)
    assert cut_torn_tail(path) == removed
    assert path.read_bytes() == kept


def test_cut_torn_tail_leaves_a_missing_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "diagnostic.jsonl"
    assert cut_torn_tail(path) == 0
    assert not path.exists()


# ----------------------------------------------------------------------------- the sink


def test_a_resumed_attempt_appends_after_cutting_the_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "diagnostic.jsonl"
    path.write_bytes(OLD_BATCH + OLD_STEP + TORN)
    sink = _resume(tmp_path)
    data = path.read_bytes()
    assert data == OLD_BATCH + OLD_STEP + NEW_BATCH + NEW_STEP + NEW_END
    for line in data.splitlines():
        validate_line(parse_line(line))
    assert sink.dropped == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diagnostic.jsonl"]


def test_the_first_attempt_still_refuses_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "diagnostic.jsonl"
    path.write_bytes(OLD_BATCH + OLD_STEP + TORN)
    with pytest.raises(ConfigError) as info:
        DiagnosticSink().open(run_context(tmp_path, attempt=0))
    assert info.value.exit_code == EXIT_BAD_INPUT == 2
    assert str(info.value) == (
        f"run.dir: {str(path)!r} already exists and is never overwritten; choose another run.dir"
    )
    assert path.read_bytes() == OLD_BATCH + OLD_STEP + TORN, "the first attempt cuts nothing"


def test_a_resumed_attempt_creates_a_missing_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _resume(run_dir)
    assert (run_dir / "diagnostic.jsonl").read_bytes() == NEW_BATCH + NEW_STEP + NEW_END


def test_a_resumed_attempt_without_records_keeps_the_earlier_file(tmp_path: Path) -> None:
    path = tmp_path / "run" / "diagnostic.jsonl"
    path.parent.mkdir()
    path.write_bytes(OLD_BATCH + OLD_STEP + TORN)
    sink = DiagnosticSink()
    sink.open(run_context(path.parent, attempt=1))
    sink.close()
    assert path.read_bytes() == OLD_BATCH + OLD_STEP


def test_a_resumed_attempt_without_records_removes_only_what_it_created(tmp_path: Path) -> None:
    run_dir = tmp_path / "a" / "run"
    sink = DiagnosticSink()
    sink.open(run_context(run_dir, attempt=2))
    assert (run_dir / "diagnostic.jsonl").exists()
    sink.close()
    assert list(tmp_path.iterdir()) == [], "the file and the directories open made are gone"


def test_rotation_counts_the_bytes_already_in_the_file(tmp_path: Path) -> None:
    """The old file holds two lines and the first new one would pass max_bytes, so the file rotates
    before it (an older part shifts up as usual); the three new lines fit in one file."""
    path = tmp_path / "diagnostic.jsonl"
    path.write_bytes(OLD_BATCH + OLD_STEP + TORN)
    (tmp_path / "diagnostic.jsonl.1").write_bytes(OLD_BATCH)
    max_bytes = len(OLD_BATCH + OLD_STEP + NEW_BATCH) - 1
    assert len(NEW_BATCH + NEW_STEP + NEW_END) <= max_bytes
    _resume(tmp_path, DiagnosticSink(max_bytes=max_bytes, backups=3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "diagnostic.jsonl", "diagnostic.jsonl.1", "diagnostic.jsonl.2"
    ]  # fmt: skip
    assert (tmp_path / "diagnostic.jsonl.2").read_bytes() == OLD_BATCH
    assert (tmp_path / "diagnostic.jsonl.1").read_bytes() == OLD_BATCH + OLD_STEP
    assert path.read_bytes() == NEW_BATCH + NEW_STEP + NEW_END


def test_rotated_parts_are_left_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "diagnostic.jsonl"
    path.write_bytes(OLD_STEP)
    (tmp_path / "diagnostic.jsonl.1").write_bytes(OLD_BATCH + TORN)
    _resume(tmp_path)
    assert (tmp_path / "diagnostic.jsonl.1").read_bytes() == OLD_BATCH + TORN
    assert path.read_bytes() == OLD_STEP + NEW_BATCH + NEW_STEP + NEW_END


def test_each_rank_appends_to_its_own_file(tmp_path: Path) -> None:
    name = rank_filename("diagnostic.jsonl", 1)
    rank1 = tmp_path / name
    rank1.write_bytes(OLD_BATCH.replace(b'"rank":0,"world_size":1', b'"rank":1,"world_size":2') + TORN)
    (tmp_path / "diagnostic.jsonl").write_bytes(OLD_BATCH + TORN)
    _resume(tmp_path, DiagnosticSink(name), rank=1, world_size=2)
    _resume(tmp_path, DiagnosticSink(), rank=0, world_size=2)
    ranked = [line.replace(b'"rank":0,"world_size":1', b'"rank":1,"world_size":2') for line in
              (OLD_BATCH, NEW_BATCH, NEW_STEP, NEW_END)]  # fmt: skip
    assert rank1.read_bytes() == b"".join(ranked)
    in_two = [line.replace(b'"world_size":1', b'"world_size":2') for line in (NEW_BATCH, NEW_STEP, NEW_END)]
    assert (tmp_path / "diagnostic.jsonl").read_bytes() == OLD_BATCH + b"".join(in_two)
    for line in rank1.read_bytes().splitlines():
        validate_line(parse_line(line))
