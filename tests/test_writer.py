"""The background writer's policies, which the sink gives it: when queued lines reach the stream,
and which items are dropped behind a slow consumer."""

from __future__ import annotations

import io
import threading
import time

from traintel.records import Record, RunEndRecord
from traintel.sinks._policy import droppable, urgent
from traintel.sinks._writer import BackgroundWriter
from traintel.testing import batch_record, end_record, epoch_record, step_record


class _Stream(io.BytesIO):
    """A stream that notes when it was written to."""

    def __init__(self) -> None:
        super().__init__()
        self.wrote = threading.Event()

    def write(self, data: bytes, /) -> int:  # type: ignore[override]
        n = super().write(data)
        self.wrote.set()
        return n


def _render(record: Record, dropped: int) -> bytes:
    return f"{record.event} {dropped}\n".encode()


def _step(n: int) -> Record:
    return step_record(step=n)


def _is_end(record: Record) -> bool:
    return isinstance(record, RunEndRecord)


def _settled(stream: _Stream, timeout: float = 5.0) -> bool:
    """Wait for a write, then for the writer to go quiet."""
    if not stream.wrote.wait(timeout):
        return False
    time.sleep(0.05)
    return True


def test_the_first_line_goes_out_at_once_and_later_routine_lines_wait_for_the_linger() -> None:
    stream = _Stream()
    writer = BackgroundWriter("t", stream, urgent=_is_end, linger=60.0)
    try:
        assert writer.offer_many([_step(1)], _render) == 1
        assert _settled(stream)
        assert stream.getvalue() == b"train.step 0\n"
        stream.wrote.clear()
        writer.offer_many([_step(2), epoch_record()], _render)  # an epoch record is not urgent either
        assert not stream.wrote.wait(0.5)
        writer.offer_many([end_record()], _render)  # run.end wakes the writer
        assert _settled(stream)
        assert stream.getvalue() == b"train.step 0\ntrain.step 0\ntrain.epoch 0\nrun.end 0\n"
    finally:
        assert writer.close()


def test_half_a_queue_wakes_the_writer_before_the_linger() -> None:
    stream = _Stream()
    writer = BackgroundWriter("t", stream, capacity=20, linger=60.0)
    try:
        writer.offer_many([_step(0)], _render)
        assert _settled(stream)
        stream.wrote.clear()
        writer.offer_many([_step(i) for i in range(1, 10)], _render)  # 9 < 20 // 2
        assert not stream.wrote.wait(0.5)
        writer.offer_many([_step(10)], _render)  # 10 waiting: half the capacity
        assert _settled(stream)
        assert stream.getvalue().count(b"\n") == 11
    finally:
        assert writer.close()


def test_lines_waiting_at_close_are_written() -> None:
    stream = _Stream()
    writer = BackgroundWriter("t", stream, linger=60.0)
    writer.offer_many([_step(1)], _render)
    assert _settled(stream)
    writer.offer_many([_step(2), _step(3)], _render)
    assert writer.close()
    assert stream.getvalue().count(b"train.step") == 3


def test_a_full_queue_drops_only_what_the_policy_calls_droppable_and_reports_the_count() -> None:
    stream = _Stream()
    writer = BackgroundWriter("t", stream, droppable=droppable, capacity=3, threaded=False)
    writer._queue.extend([b"waiting\n"] * 3)  # a consumer that fell behind: no room
    batch = [batch_record(batch=1), batch_record(batch=2), _step(1), batch_record(batch=3), end_record()]
    assert writer.offer_many(batch, _render) == 2
    assert (writer.dropped, stream.getvalue()) == (3, b"train.step 2\nrun.end 1\n")


def test_without_a_policy_nothing_is_dropped() -> None:
    stream = _Stream()
    writer = BackgroundWriter("t", stream, capacity=1, threaded=False)
    writer._queue.append(b"waiting\n")  # no room left
    assert writer.offer_many([batch_record(batch=3), end_record()], _render) == 2
    assert (writer.dropped, stream.getvalue()) == (0, b"train.batch 0\nrun.end 0\n")


def test_without_a_policy_no_line_is_urgent() -> None:
    stream = _Stream()
    writer = BackgroundWriter("t", stream, linger=60.0)
    try:
        writer.offer_many([_step(1)], _render)  # the first line wakes the writer
        assert _settled(stream)
        stream.wrote.clear()
        writer.offer_many([end_record()], _render)
        assert not stream.wrote.wait(0.5)
    finally:
        assert writer.close()
    assert stream.getvalue() == b"train.step 0\nrun.end 0\n"


def test_the_sinks_policy_drops_batch_records_and_hurries_run_end_and_sink_errors() -> None:
    from traintel.records import SinkErrorRecord

    error = SinkErrorRecord(run_id="r1", time=1.0, sink="x", error="OSError: full")
    records = [batch_record(), step_record(), epoch_record(), end_record(), error]
    assert [droppable(r) for r in records] == [True, False, False, False, False]
    assert [urgent(r) for r in records] == [False, False, False, True, True]
