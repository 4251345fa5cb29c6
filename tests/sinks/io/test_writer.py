"""The background writer's policies, which the sink gives it: when queued lines reach the stream,
which items are dropped behind a slow consumer (a line bound, and a byte bound on everything
waiting), and how it goes on after a write error."""

from __future__ import annotations

import errno
import fcntl
import io
import itertools
import os
import struct
import termios
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from traintel.records import Record, RunEndRecord
from traintel.sinks._policy import DROP_FIRST, DROP_LAST, KEEP, droppable, urgent
from traintel.sinks.io.writer import CHUNK_OVERHEAD, PIPE_BUF, BackgroundWriter, FdStream, IncompleteWrite
from traintel.sinks.json.sink import JsonSink
from traintel.testing import batch_record, end_record, epoch_record, step_record

F_SETPIPE_SZ = 1031  # Linux fcntl: set a pipe's capacity


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


class _Stalled:
    """A consumer that has stopped reading: ``write`` blocks until ``go`` is set."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.entered = threading.Event()
        self.data = bytearray()

    def write(self, data: bytes, /) -> int:
        self.entered.set()
        assert self.go.wait(30)
        self.data += data
        return len(data)

    def flush(self) -> None:
        pass


def _stalled_writer(**kwargs: Any) -> tuple[BackgroundWriter[Record], _Stalled]:
    """A writer whose first line is taken and stuck in ``write``: everything after it waits."""
    stream = _Stalled()
    writer: BackgroundWriter[Record] = BackgroundWriter(
        "t", stream, droppable=droppable, linger=0.0, **kwargs
    )
    writer.offer_many([_step(0)], _render)
    assert stream.entered.wait(5)
    return writer, stream


def _released(writer: BackgroundWriter[Record], stream: _Stalled) -> list[str]:
    stream.go.set()
    assert writer.close()
    return stream.data.decode().splitlines()


def test_lines_still_waiting_when_close_gives_up_are_counted_as_dropped() -> None:
    writer, stream = _stalled_writer(close_timeout=0.2)
    writer.offer_many([_step(1), _step(2)], _render)
    writer.offer_many([_step(3)], _render)
    try:
        assert writer.close() is False
        assert writer.dropped == 4  # the line stuck in write() and the three behind it
    finally:
        stream.go.set()


def test_a_full_line_bound_drops_only_batch_records_and_reports_the_count() -> None:
    writer, stream = _stalled_writer(capacity=3)
    writer.offer_many([epoch_record(), epoch_record()], _render)  # 3 lines waiting: the line bound
    batch = [batch_record(batch=1), batch_record(batch=2), _step(1), batch_record(batch=3), end_record()]
    assert writer.offer_many(batch, _render) == 2
    assert writer.dropped == 3
    assert _released(writer, stream) == [
        "train.step 0", "train.epoch 0", "train.epoch 0", "train.step 2", "run.end 1",
    ]  # fmt: skip


def test_without_a_policy_nothing_is_dropped() -> None:
    stream = _Stalled()
    writer: BackgroundWriter[Record] = BackgroundWriter("t", stream, capacity=1, max_bytes=1, linger=0.0)
    writer.offer_many([_step(0)], _render)
    assert stream.entered.wait(5)  # the line bound and the byte bound are both reached
    assert writer.offer_many([batch_record(batch=3), _step(1), end_record()], _render) == 3
    assert writer.dropped == 0
    assert _released(writer, stream) == ["train.step 0", "train.batch 0", "train.step 0", "run.end 0"]


def _padded(record: Record, dropped: int) -> bytes:
    """A 100-byte line: the event and the dropped count, padded."""
    return f"{record.event} {dropped}".ljust(99).encode() + b"\n"


def test_the_byte_bound_drops_batch_records_at_half_then_step_records_and_keeps_the_rest() -> None:
    chunk = 100 + CHUNK_OVERHEAD  # one 100-byte line per call
    bound = 10 * chunk
    writer, stream = _stalled_writer(max_bytes=bound)
    offered = {"train.batch": 0, "train.step": 0, "train.epoch": 0}
    first_batch_drop = first_step_drop = None
    for i in range(40):
        for record in (batch_record(batch=i), _step(i + 1), epoch_record(epoch=i)):
            before = writer.dropped
            offered[record.event] += 1
            writer.offer_many([record], _padded)
            if writer.dropped > before and record.event == "train.batch" and first_batch_drop is None:
                first_batch_drop = writer.waiting_bytes
            if writer.dropped > before and record.event == "train.step" and first_step_drop is None:
                first_step_drop = writer.waiting_bytes
            assert writer.waiting_bytes <= bound + 40 * chunk  # beyond the bound: the epoch lines
    # batch records go once half the bound waits; step records only once all of it does (a record
    # is looked at once per three: the limits are crossed by up to three lines)
    assert first_batch_drop is not None and bound / 2 <= first_batch_drop < bound / 2 + 3 * chunk
    assert first_step_drop is not None and bound <= first_step_drop < bound + 3 * chunk
    writer.offer_many([end_record()], _padded)
    lines = _released(writer, stream)
    events = [line.split()[0] for line in lines]
    assert events.count("train.epoch") == 40  # never dropped
    assert events[-1] == "run.end"
    assert 0 < events.count("train.batch") < events.count("train.step") - 1 < 40
    reported = sum(int(line.split()[1]) for line in lines)
    assert reported == writer.dropped == 80 - events.count("train.batch") - (events.count("train.step") - 1)


def test_submitted_lines_of_a_droppable_rank_are_dropped_and_counted_on_the_next_record() -> None:
    writer, stream = _stalled_writer()
    writer.max_bytes = writer.waiting_bytes + 3 * (100 + CHUNK_OVERHEAD)
    for _ in range(3):
        assert writer.submit(b"x".ljust(99) + b"\n", rank=DROP_LAST)  # then the bound is reached
    assert not writer.submit(b"y\n", rank=DROP_LAST)
    assert writer.submit(b"kept\n")  # a routed log line: always kept
    assert writer.dropped == 1
    writer.offer_many([epoch_record()], _render)
    assert _released(writer, stream)[-2:] == ["kept", "train.epoch 1"]


def test_a_queued_line_costs_its_length_not_the_renderers_buffer() -> None:
    """orjson's lines sit in buffers of several KiB; the writer keeps exact-size copies, and what
    ``waiting_bytes`` counts is what the queue really holds."""
    sink = JsonSink(io.BytesIO())
    writer, stream = _stalled_writer(max_bytes=1 << 30)
    records = [step_record(step=i) for i in range(2_000)]
    base = writer.waiting_bytes
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for record in records:
            writer.offer_many([record], sink.render)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    lines = len(sink.render(records[0]))
    counted = writer.waiting_bytes - base
    assert held < 1.1 * counted, (held / len(records), counted / len(records), lines)
    assert counted < len(records) * (lines + CHUNK_OVERHEAD + 8)
    assert len(_released(writer, stream)) == len(records) + 1


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


def test_the_sinks_policy_drops_batch_then_step_records_and_hurries_run_end_and_sink_errors() -> None:
    from traintel.records import SinkErrorRecord

    error = SinkErrorRecord(run_id="r1", time=1.0, sink="x", error="OSError: full")
    records = [batch_record(), step_record(), epoch_record(), end_record(), error]
    assert [droppable(r) for r in records] == [DROP_FIRST, DROP_LAST, KEEP, KEEP, KEEP]
    assert [urgent(r) for r in records] == [False, False, False, True, True]


def _pipe(size: int = 65536) -> tuple[int, int]:
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, size)
    return r, w


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_pipe_gets_whole_lines_of_at_most_pipe_buf_bytes_per_write(monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[bytes] = []
    real_write = os.write

    def spy(fd: int, data: Any) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    r, w = _pipe()
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(_read_all(r)), daemon=True)
    reader.start()
    stream = FdStream(w)
    data = b"".join(f'{{"n":{i},"pad":"{"x" * (i % 700)}"}}\n'.encode() for i in range(300))
    long = b'{"long":"' + b"y" * 3 * PIPE_BUF + b'"}\n'
    monkeypatch.setattr(os, "write", spy)
    stream.write(data + long + data)
    monkeypatch.undo()
    os.close(w)
    reader.join(10)
    os.close(r)
    assert received == [data + long + data]
    assert len(writes) > 2 * len(data) // PIPE_BUF
    assert long in writes  # a line longer than PIPE_BUF: one write of its own
    for piece in writes:
        assert piece.endswith(b"\n")
        assert len(piece) <= PIPE_BUF or piece == long


def test_a_file_gets_one_write_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[int] = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(len(data)) or real_write(fd, data))
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    stream = FdStream(fd)
    data = b"".join(b'{"n":%d}\n' % i for i in range(5_000))
    stream.write(data)
    stream.close()
    assert writes == [len(data)]


def test_a_long_line_waits_for_an_empty_pipe_instead_of_blocking_half_written() -> None:
    r, w = _pipe(PIPE_BUF * 4)
    stream = FdStream(w)
    os.write(w, b"x" * (PIPE_BUF * 3 + 100) + b"\n")  # unread: a 3 * PIPE_BUF line has no room
    long = b"y" * (PIPE_BUF * 3) + b"\n"
    writer = threading.Thread(target=stream.write, args=(b"short\n" + long,), daemon=True)
    writer.start()
    time.sleep(0.3)
    assert _unread(w) == PIPE_BUF * 3 + 101 + len(b"short\n")  # the short line went, the long one waits
    assert os.read(r, 1 << 20) == b"x" * (PIPE_BUF * 3 + 100) + b"\n" + b"short\n"  # the reader catches up
    writer.join(5)
    assert not writer.is_alive()
    os.close(w)
    assert _read_all(r) == long
    os.close(r)


def _unread(fd: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])


def _numbered(record: Record, dropped: int) -> bytes:
    """The event, the record's step and the dropped count."""
    return f"{record.event} {getattr(record, 'step', '-')} {dropped}\n".encode()


class _FillingDisk:
    """A real file on which writing fails with ENOSPC while ``full`` is set: before writing anything,
    or, the first time, after ``partial`` bytes of whole lines went out (a disk that fills during a
    write); ``tries`` notes when each write was tried, ``wrote`` is set by a write that succeeded."""

    def __init__(self, path: Path, *, fails: int, partial: int = 0) -> None:
        self.file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed by the test
        self.fails = fails
        self.partial = partial
        self.tries: list[float] = []
        self.wrote = threading.Event()

    def write(self, data: bytes, /) -> int:
        self.tries.append(time.monotonic())
        if self.fails:
            self.fails -= 1
            full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written, self.partial = self.partial, 0
            if written:
                self.file.write(data[:written])
                raise IncompleteWrite(full, written)
            raise full
        self.file.write(data)
        self.wrote.set()
        return len(data)

    def flush(self) -> None:
        pass


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_a_write_error_is_tried_again_after_a_growing_delay_and_the_lines_are_written_once(
    tmp_path: Path,
) -> None:
    stream = _FillingDisk(tmp_path / "out", fails=4)
    writer: BackgroundWriter[Record] = BackgroundWriter("t", stream, retry=(0.02, 0.08), linger=0.0)
    writer.offer_many([_step(1), _step(2)], _numbered)
    assert stream.wrote.wait(10)
    assert writer.close()
    stream.file.close()
    assert (tmp_path / "out").read_bytes() == b"train.step 1 0\ntrain.step 2 0\n"
    assert (writer.failed, writer.failures, writer.dropped) == (None, 1, 0)
    gaps = [later - earlier for earlier, later in itertools.pairwise(stream.tries)]
    assert len(gaps) == 4
    assert [gap >= delay for gap, delay in zip(gaps, [0.02, 0.04, 0.08, 0.08], strict=True)] == [True] * 4


def test_a_write_cut_short_goes_on_after_its_last_whole_line(tmp_path: Path) -> None:
    stream = _FillingDisk(tmp_path / "out", fails=2, partial=len(b"train.step 1 0\n"))
    writer: BackgroundWriter[Record] = BackgroundWriter("t", stream, retry=(0.01, 0.01), linger=0.0)
    writer.offer_many([_step(1), _step(2), _step(3)], _numbered)
    assert stream.wrote.wait(10)
    assert writer.close()
    stream.file.close()
    assert (tmp_path / "out").read_bytes() == b"train.step 1 0\ntrain.step 2 0\ntrain.step 3 0\n"
    assert writer.dropped == 0


def test_while_writing_fails_the_queue_bounds_drop_and_count_and_the_waiting_lines_are_written_late(
    tmp_path: Path,
) -> None:
    stream = _FillingDisk(tmp_path / "out", fails=1_000_000)
    writer: BackgroundWriter[Record] = BackgroundWriter(
        "t", stream, droppable=droppable, capacity=3, retry=(0.01, 0.05), linger=0.0
    )
    writer.offer_many([_step(1)], _numbered)
    _wait_for(lambda: writer.failed is not None, "the write did not fail")
    assert writer.waiting_lines == 1  # the line that failed is kept for the next try
    batch = [batch_record(step=2), batch_record(step=2), _step(2), batch_record(step=2), epoch_record(step=2)]
    assert writer.offer_many(batch, _numbered) == 4  # the third batch record: past the line bound
    assert writer.dropped == 1
    stream.fails = 0  # space is back
    assert stream.wrote.wait(10)
    writer.offer_many([_step(3)], _numbered)
    assert writer.close()
    stream.file.close()
    assert (tmp_path / "out").read_text().splitlines() == [
        "train.step 1 0", "train.batch 2 0", "train.batch 2 0", "train.step 2 0", "train.epoch 2 1",
        "train.step 3 0",
    ]  # fmt: skip
    assert (writer.failed, writer.failures, writer.dropped) == (None, 1, 1)


def test_drain_returns_false_at_once_while_writing_fails(tmp_path: Path) -> None:
    stream = _FillingDisk(tmp_path / "out", fails=1_000_000)
    writer: BackgroundWriter[Record] = BackgroundWriter("t", stream, retry=(0.01, 0.05), linger=0.0)
    writer.offer_many([_step(1)], _numbered)
    _wait_for(lambda: writer.failed is not None, "the write did not fail")
    drained: list[bool] = []
    waiter = threading.Thread(target=lambda: drained.append(writer.drain(600.0)), daemon=True)
    waiter.start()
    waiter.join(30)
    assert drained == [False]  # returned long before its 600 s
    assert writer.close()
    stream.file.close()


def test_a_close_while_writing_fails_tries_once_more_and_counts_the_lines_lost(tmp_path: Path) -> None:
    stream = _FillingDisk(tmp_path / "out", fails=1_000_000)
    writer: BackgroundWriter[Record] = BackgroundWriter(
        "t", stream, retry=(60.0, 60.0), linger=0.0, close_timeout=30.0
    )
    writer.offer_many([_step(1), _step(2)], _numbered)
    _wait_for(lambda: writer.failed is not None, "the write did not fail")
    writer.offer_many([_step(3)], _numbered)
    assert writer.close()  # not after the 60 s delay: at once, with one more try of each batch
    stream.file.close()
    assert len(stream.tries) == 3
    assert writer.dropped == 3
    assert (tmp_path / "out").read_bytes() == b""


def test_without_retry_a_write_error_ends_the_writing_and_later_lines_are_counted_as_lost(
    tmp_path: Path,
) -> None:
    stream = _FillingDisk(tmp_path / "out", fails=1)
    writer: BackgroundWriter[Record] = BackgroundWriter("t", stream, linger=0.0)
    writer.offer_many([_step(1)], _numbered)
    _wait_for(lambda: writer.dropped == 1, "the line was not lost")
    writer.offer_many([_step(2)], _numbered)
    assert writer.close()
    stream.file.close()
    assert (tmp_path / "out").read_bytes() == b""
    assert (writer.failures, writer.dropped, len(stream.tries)) == (1, 2, 1)
    assert isinstance(writer.failed, OSError)
