"""The background writer's wake-up policy: when queued lines reach the stream."""

from __future__ import annotations

import io
import threading
import time

from traintel.records import EpochRecord, Record, RunEndRecord, StepRecord
from traintel.sinks._writer import BackgroundWriter


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


def _step(n: int) -> StepRecord:
    return StepRecord(run_id="r", time=1.0, epoch=1, step=n, items=1, items_total=n, window_size=1,
                      loss=0.5, lr=0.1, grad_norm=None, skipped=False)  # fmt: skip


def _end() -> RunEndRecord:
    return RunEndRecord(run_id="r", time=2.0, status="completed", reason="max_epochs", epoch=1, step=1,
                        items_total=1, duration_seconds=1.0)  # fmt: skip


def _epoch() -> EpochRecord:
    return EpochRecord(run_id="r", time=2.0, epoch=1, step=1, loss=0.5, items=1, batches=1,
                       duration_seconds=1.0, items_per_second=1.0, items_total=1, steps=1)  # fmt: skip


def _settled(stream: _Stream, timeout: float = 5.0) -> bool:
    """Wait for a write, then for the writer to go quiet."""
    if not stream.wrote.wait(timeout):
        return False
    time.sleep(0.05)
    return True


def test_the_first_line_goes_out_at_once_and_later_routine_lines_wait_for_the_linger() -> None:
    stream = _Stream()
    writer = BackgroundWriter("t", stream, linger=60.0)
    try:
        assert writer.offer_many([_step(1)], _render) == 1
        assert _settled(stream)
        assert stream.getvalue() == b"train.step 0\n"
        stream.wrote.clear()
        writer.offer_many([_step(2), _epoch()], _render)  # an epoch record is not urgent either
        assert not stream.wrote.wait(0.5)
        writer.offer_many([_end()], _render)  # run.end wakes the writer
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
