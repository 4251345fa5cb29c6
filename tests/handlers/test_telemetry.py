"""Batched delivery of step records, the fan-out's emit_many, shared JSON rendering, and the
trainer's event dispatch."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import torch
from ignite.engine import Engine, Events

from tests.helpers.lines import strict_object
from tests.helpers.runs import quiet_config
from tests.helpers.tasks import make_batches, make_model
from traintel.engine.trainer import TraintelEngine
from traintel.records import Record
from traintel.run.api import build
from traintel.sinks import DiagnosticSink, FanOut, JsonSink
from traintel.sinks.memory import MemorySink
from traintel.task import Task
from traintel.testing import batch_record, run_context, step_record


def _run(tmp_path: Path, max_delay: float, *, epochs: int = 2, **handlers: Any) -> tuple[MemorySink, Any]:
    """7 micro-batches of 4, k=3 (3 steps per epoch), every step emitted; ``handlers`` maps an
    Ignite event name to a handler attached after traintel's."""
    cfg = quiet_config(tmp_path, accumulation_steps=3, max_epochs=epochs)
    cfg["telemetry"] = {"every": 1, "max_delay_seconds": max_delay}
    sink = MemorySink()
    task = Task(model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches([4] * 7))
    run = build(cfg, task, sinks=[sink])
    for event, handler in handlers.items():
        run.trainer.add_event_handler(getattr(Events, event), handler)
    return sink, run


def _events(sink: MemorySink) -> list[str]:
    return [f"{r.event}:{getattr(r, 'step', '')}" for r in sink.records]


def test_with_no_delay_each_step_reaches_the_sinks_before_the_next_step(tmp_path: Path) -> None:
    seen: list[int] = []
    sink, run = _run(tmp_path, 0.0, epochs=1)
    run.trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append(len(sink.of("train.step")))
    )
    run.run()
    assert seen == [1, 2, 3]


def test_steps_slower_than_the_delay_are_delivered_as_each_ends(tmp_path: Path) -> None:
    import time

    seen: list[int] = []
    sink, run = _run(tmp_path, 0.05, epochs=1, ITERATION_STARTED=lambda e: time.sleep(0.06))
    run.trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append(len(sink.of("train.step")))
    )
    run.run()
    assert seen == [1, 2, 3]


def test_waiting_steps_arrive_in_order_before_the_epoch_record_with_their_own_times(
    tmp_path: Path,
) -> None:
    seen: list[int] = []
    sink, run = _run(tmp_path, 60.0)
    run.trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append(len(sink.of("train.step")))
    )
    run.run()
    # the first emitted step goes at once; later ones wait for their epoch's end
    assert seen == [1, 1, 1, 3, 3, 3]
    assert _events(sink) == [
        "run.start:",
        *["train.batch:0"] * 3, "train.step:1",
        *["train.batch:1"] * 3, "train.step:2",
        "train.batch:2", "train.step:3",
        "train.epoch:3",
        *["train.batch:3"] * 3, "train.step:4",
        *["train.batch:4"] * 3, "train.step:5",
        "train.batch:5", "train.step:6",
        "train.epoch:6",
        "run.end:6",
    ]  # fmt: skip
    steps = sink.of("train.step")
    times = [r.time for r in steps]
    assert times == sorted(times) and len(set(times)) == 6  # noted at each step, not at delivery
    for batch in sink.of("train.batch"):
        assert batch.time == steps[batch.step].time  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["terminate", "raise"])
def test_waiting_steps_are_delivered_before_run_end_when_the_run_stops_early(
    tmp_path: Path, how: str
) -> None:
    def stop(engine: Engine) -> None:
        if engine.state.iteration == 5:
            if how == "raise":
                msg = "boom at step 5"
                raise RuntimeError(msg)
            engine.terminate()

    sink, run = _run(tmp_path, 60.0, ITERATION_COMPLETED=stop)
    if how == "raise":
        with pytest.raises(RuntimeError, match="boom at step 5"):
            run.run()
    else:
        run.run()
    assert [r.step for r in sink.of("train.step")] == [1, 2, 3, 4, 5]  # type: ignore[attr-defined]
    assert _events(sink)[-2:] == ["train.step:5", "run.end:5"]
    end = sink.records[-1]
    assert end.status == ("failed" if how == "raise" else "completed")  # type: ignore[attr-defined]


def test_max_delay_seconds_is_validated(tmp_path: Path) -> None:
    from traintel.errors import ConfigError

    cfg = quiet_config(tmp_path)
    cfg["telemetry"] = {"max_delay_seconds": -1}
    with pytest.raises(
        ConfigError, match=r"telemetry\.max_delay_seconds: input should be greater than or equal to 0"
    ):
        build(
            cfg,
            Task(model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches([4])),
        )


class _Batching(MemorySink):
    """A sink with emit_many: it records the batch sizes it was handed."""

    def __init__(self, name: str, fail: bool = False) -> None:
        super().__init__(name)
        self.batches: list[int] = []
        self.fail = fail

    def emit_many(self, records: Any) -> None:
        self.batches.append(len(records))
        if self.fail:
            msg = "cannot take a batch"
            raise OSError(msg)
        self.records.extend(records)


def _step_records(n: int) -> list[Record]:
    return [step_record(time=1.0 + i, step=i + 1, items=4, items_total=4 * (i + 1)) for i in range(n)]


def test_fan_out_hands_batches_to_emit_many_and_falls_back_to_emit(tmp_path: Path) -> None:
    batching, plain = _Batching("batching"), MemorySink("plain")
    fan = FanOut([batching, plain])
    fan.open(run_context(tmp_path))
    records = _step_records(5)
    fan.emit_many(records)
    fan.emit_many(records[:2])
    fan.emit_many([])
    assert batching.batches == [5, 2]
    assert batching.records == plain.records == records + records[:2]
    assert fan.errors == {"batching": 0, "plain": 0}
    fan.close()


def test_a_failing_emit_many_is_reported_once_to_the_other_sinks(tmp_path: Path) -> None:
    plain, broken = MemorySink("plain"), _Batching("broken", fail=True)
    fan = FanOut([broken, plain])
    fan.open(run_context(tmp_path))
    fan.emit_many(_step_records(3))
    fan.emit_many(_step_records(3))
    events = [r.event for r in plain.records]
    assert events == [
        "sink.error",
        "train.step",
        "train.step",
        "train.step",
        "train.step",
        "train.step",
        "train.step",
    ]
    assert plain.records[0].error == "OSError: cannot take a batch"  # type: ignore[attr-defined]
    assert fan.errors["broken"] == 2


def _lines(tmp_path: Path, records: list[Record]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The stdout and diagnostic-file lines of ``records``."""
    out = io.BytesIO()
    json_sink, diag = JsonSink(out, capacity=100), DiagnosticSink()
    fan = FanOut([json_sink, diag])
    fan.open(run_context(tmp_path))
    fan.emit_many(records)
    fan.close()
    stdout = [strict_object(line) for line in out.getvalue().splitlines()]
    file = [strict_object(line) for line in (tmp_path / "diagnostic.jsonl").read_text().splitlines()]
    return stdout, file


def test_stdout_and_diagnostic_lines_share_one_rendering(tmp_path: Path) -> None:
    diag = MappingProxyType({"expected_loss_scale": 0.5, "observed_loss_scale": None, "scale_ok": None,
                             "rss_bytes": 123})  # fmt: skip
    finite = batch_record(diagnostics=diag, batch=1, raw_loss=0.0, loss=0.0)
    nan = batch_record(diagnostics=MappingProxyType({"observed_loss_scale": math.inf}), raw_loss=math.nan,
                       loss=math.nan)  # fmt: skip
    stdout, file = _lines(tmp_path, [finite, nan])
    public = {k: v for k, v in file[0].items() if k not in diag}
    assert stdout[0] == public
    assert list(file[0]) == [
        *stdout[0],
        "expected_loss_scale",
        "observed_loss_scale",
        "scale_ok",
        "rss_bytes",
    ]
    assert file[0]["observed_loss_scale"] is None and file[0]["rss_bytes"] == 123
    # a non-finite value on either side: one nonfinite object naming all of them
    assert stdout[1]["nonfinite"] == {"raw_loss": "nan", "loss": "nan"}
    assert file[1]["nonfinite"] == {"raw_loss": "nan", "loss": "nan", "observed_loss_scale": "inf"}
    assert file[1]["observed_loss_scale"] is None and list(file[1])[-1] == "nonfinite"


def test_trainer_fires_handlers_with_ignites_calling_convention(caplog: pytest.LogCaptureFixture) -> None:
    engine = TraintelEngine(lambda e, b: b)
    calls: list[tuple[Any, ...]] = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e, a, k=None: calls.append((e, a, k)), 1, k=2)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda: calls.append(("no engine",)))
    engine.add_event_handler(
        Events.ITERATION_COMPLETED(every=2), lambda e: calls.append(("every 2", e.state.iteration))
    )
    engine.add_event_handler(Events.EXCEPTION_RAISED, lambda e, exc: calls.append(("raised", str(exc))))
    engine.run([10, 20, 30, 40], max_epochs=1)
    one, two = (engine, 1, 2), ("no engine",)
    assert calls == [one, two, one, two, ("every 2", 2), one, two, one, two, ("every 2", 4)]

    def fail(_e: Engine, batch: int) -> None:
        if batch == 20:
            msg = "bad batch"
            raise ValueError(msg)

    failing = TraintelEngine(fail)
    failing.add_event_handler(Events.EXCEPTION_RAISED, lambda e, exc: calls.append(("raised", str(exc))))
    failing.run([10, 20, 30], max_epochs=1)
    assert calls[-1] == ("raised", "bad batch")

    # at DEBUG the engine fires through Ignite itself, debug message included
    debug = TraintelEngine(lambda e, b: b)
    debug.logger.setLevel(logging.DEBUG)
    try:
        with caplog.at_level(logging.DEBUG, logger=debug.logger.name):
            debug.run([1], max_epochs=1)
    finally:
        debug.logger.setLevel(logging.NOTSET)
    assert any(
        "Firing handlers for event Events.ITERATION_COMPLETED" in r.getMessage() for r in caplog.records
    )


def test_timestamps_match_datetime_rounding() -> None:
    import random
    from datetime import datetime, timezone

    from traintel.sinks.json.lines import iso_utc

    rng = random.Random(0)
    samples = [0.0, 1.9999995, 1.9999994, 59.9999996, 1_700_000_000.5, 1_700_000_000.0000005, -1.25]
    samples += [rng.uniform(0, 4e9) for _ in range(5000)] + [
        round(rng.uniform(0, 4e9), 6) for _ in range(5000)
    ]
    for t in samples:
        assert iso_utc(t) == datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), t
    assert iso_utc(1.9999996) == "1970-01-01T00:00:02.000000Z"  # rounds up into the next second
