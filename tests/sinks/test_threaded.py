"""A sink on a thread of its own (``ThreadedSink``): order kept, a full queue drops and counts the
routine records only, a failure is reported once by the fan-out, close is bounded, and a slow
plug-in never holds training (``sinks.extra[].threaded``, or the sink's ``threaded`` attribute)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Events

from tests.helpers.runs import quiet_config
from tests.helpers.servers import wait_until
from tests.helpers.tasks import make_batches, make_model
from traintel.records import Record
from traintel.run.api import build
from traintel.sinks.base import RunContext
from traintel.sinks.fanout import FanOut
from traintel.sinks.memory import MemorySink
from traintel.sinks.threaded import ThreadedSink
from traintel.task import Task
from traintel.testing import end_record, epoch_record, run_context, step_record


class Gated:
    """A sink whose deliveries wait until ``gate`` is set; it notes each record and its thread."""

    name = "gated"

    def __init__(self, *, fail_at: int | None = None) -> None:
        self.gate = threading.Event()
        self.records: list[Record] = []
        self.threads: set[str] = set()
        self.entered = threading.Event()
        self.fail_at = fail_at
        self.closed = 0

    def open(self, context: RunContext) -> None:
        self.threads.add(threading.current_thread().name)

    def emit_many(self, records: Sequence[Record]) -> None:
        self.entered.set()
        self.threads.add(threading.current_thread().name)
        if not self.gate.wait(60):
            msg = "the gate never opened"
            raise RuntimeError(msg)
        for record in records:
            if self.fail_at is not None and len(self.records) == self.fail_at:
                self.fail_at = None
                msg = "remote store unavailable"
                raise OSError(msg)
            self.records.append(record)

    def emit(self, record: Record) -> None:
        self.emit_many((record,))

    def close(self) -> None:
        self.closed += 1


def _steps(n: int) -> list[Record]:
    return [step_record(step=i) for i in range(1, n + 1)]


def test_records_arrive_in_order_on_the_sink_s_own_thread(tmp_path: Path) -> None:
    inner = Gated()
    sink = ThreadedSink(inner)
    sink.open(run_context(tmp_path))
    records = [*_steps(5), epoch_record(), end_record()]
    sink.emit_many(records[:3])
    sink.emit(records[3])
    sink.emit_many(records[4:])
    assert inner.records == []  # nothing delivered while the sink is held: the caller never waited
    inner.gate.set()
    sink.close()
    assert inner.records == records
    assert inner.threads == {"MainThread", "traintel-sink-gated"}
    assert (sink.dropped, inner.closed) == (0, 1)


def test_a_full_queue_drops_and_counts_only_routine_records(tmp_path: Path) -> None:
    inner = Gated()
    sink = ThreadedSink(inner, capacity=3)
    sink.open(run_context(tmp_path))
    sink.emit(step_record(step=1))
    wait_until(inner.entered.is_set, "the sink never took the first record")  # held by the gate
    steps = _steps(8)[1:]  # steps 2..8: three fit in the queue
    sink.emit_many([*steps[:5], epoch_record()])
    sink.emit_many([*steps[5:], end_record()])
    assert sink.dropped == 4  # steps 5, 6, 7, 8: never the epoch or the end
    inner.gate.set()
    sink.close()
    assert [(r.event, getattr(r, "step", None)) for r in inner.records] == [
        ("train.step", 1), ("train.step", 2), ("train.step", 3), ("train.step", 4),
        ("train.epoch", 1), ("run.end", 1),
    ]  # fmt: skip


def test_close_is_bounded_when_the_sink_never_returns(tmp_path: Path) -> None:
    inner = Gated()
    sink = ThreadedSink(inner, drain_seconds=0.2)
    sink.open(run_context(tmp_path))
    sink.emit_many(_steps(3))
    wait_until(inner.entered.is_set, "the sink never took the first records")
    sink.emit_many(_steps(5)[3:])
    started = time.monotonic()
    sink.close()  # the held batch stays with the sink; the two queued behind it are dropped
    assert time.monotonic() - started < 5
    assert (sink.dropped, inner.closed) == (2, 1)
    assert sink.close_timeout == pytest.approx(0.2 + 2.0)
    inner.gate.set()


def test_a_failure_on_the_sink_s_thread_is_reported_once_by_the_fan_out(tmp_path: Path) -> None:
    inner = Gated(fail_at=2)
    inner.gate.set()
    sink = ThreadedSink(inner)
    witness = MemorySink()
    fanout = FanOut([sink, witness])
    fanout.open(run_context(tmp_path))
    fanout.emit_many(_steps(4))
    assert sink.drain(10)
    fanout.emit_many(_steps(6)[4:])  # queues these two, then raises the failure
    assert sink.drain(10)
    fanout.close()
    (notice,) = witness.of("sink.error")
    assert (notice.sink, notice.error) == ("gated", "OSError: remote store unavailable")  # type: ignore[attr-defined]
    assert fanout.errors == {"gated": 1, "memory": 0}
    assert [r.step for r in inner.records] == [1, 2, 5, 6]  # type: ignore[attr-defined]


def test_a_failure_in_the_last_delivery_is_counted_at_close(tmp_path: Path) -> None:
    inner = Gated(fail_at=0)
    inner.gate.set()
    sink = ThreadedSink(inner)
    fanout = FanOut([sink])
    fanout.open(run_context(tmp_path))
    fanout.emit_many(_steps(2))
    assert sink.drain(10)
    fanout.close()
    assert fanout.errors == {"gated": 1}


class SlowPlugin:
    """A plug-in whose every delivery waits for ``release`` (a back-end far slower than training)."""

    name = "slow"
    threaded = True

    def __init__(self) -> None:
        self.release = threading.Event()
        self.records: list[Record] = []
        self.waited_out = False

    def open(self, context: RunContext) -> None:
        pass

    def emit(self, record: Record) -> None:
        if not self.release.wait(60):
            self.waited_out = True
        self.records.append(record)

    def close(self) -> None:
        pass


def _task() -> Task:
    return Task(model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches([4] * 7))


def test_a_threaded_plug_in_never_holds_training(tmp_path: Path) -> None:
    """The run trains to its end while the plug-in is still held on its first record; released, it
    gets every record, in order, before the run closes it."""
    slow, memory = SlowPlugin(), MemorySink()
    run = build(quiet_config(tmp_path, max_epochs=3, accumulation_steps=2), _task(), sinks=[slow, memory])
    seen_at_the_end: list[int] = []
    run.trainer.add_event_handler(Events.COMPLETED, lambda _: seen_at_the_end.append(len(slow.records)))
    run.trainer.add_event_handler(Events.COMPLETED, lambda _: slow.release.set())
    run.run()
    assert seen_at_the_end == [0]  # the whole run trained while the plug-in held its first record
    assert slow.records == memory.records and not slow.waited_out
    assert run.fanout.errors == {"slow": 0, "memory": 0}


def test_threaded_false_in_the_config_keeps_a_plug_in_on_the_training_thread(tmp_path: Path) -> None:
    cfg = quiet_config(tmp_path, accumulation_steps=2)
    cfg["sinks"]["extra"] = [{"factory": "tests.sinks.test_threaded:make_slow", "threaded": False}]
    run = build(cfg, _task())
    (sink,) = [s for s in run.fanout.sinks if s.name == "slow"]
    assert isinstance(sink, SlowPlugin)
    sink.release.set()
    run.run()
    cfg["run"]["dir"] = str(tmp_path / "run2")
    cfg["sinks"]["extra"] = [{"factory": "tests.sinks.test_threaded:make_slow"}]  # as the sink says
    run = build(cfg, _task())
    (wrapped,) = [s for s in run.fanout.sinks if s.name == "slow"]
    assert isinstance(wrapped, ThreadedSink) and isinstance(wrapped.sink, SlowPlugin)
    wrapped.sink.release.set()
    run.run()


def make_slow() -> Any:
    return SlowPlugin()


class FailsAtTheEnd:
    """A threaded plug-in whose delivery of the last epoch's record fails (a back-end gone at the end)."""

    name = "late"
    threaded = True

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def open(self, context: RunContext) -> None:
        pass

    def emit(self, record: Record) -> None:
        if record.event == "train.epoch" and getattr(record, "epoch", 0) == self.epochs:
            msg = "tracking server gone"
            raise ConnectionError(msg)

    def close(self) -> None:
        pass


def test_a_failure_in_a_threaded_sink_s_last_delivery_is_reported_before_run_end(tmp_path: Path) -> None:
    memory = MemorySink()
    run = build(
        quiet_config(tmp_path, max_epochs=2, accumulation_steps=2), _task(), sinks=[FailsAtTheEnd(2), memory]
    )
    run.run()
    events = [r.event for r in memory.records]
    assert events[-2:] == ["sink.error", "run.end"]
    (notice,) = memory.of("sink.error")
    assert (notice.sink, notice.error) == ("late", "ConnectionError: tracking server gone")  # type: ignore[attr-defined]
    assert run.fanout.errors == {"late": 1, "memory": 0}
