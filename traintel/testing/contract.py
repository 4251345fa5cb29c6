"""``check_sink``: the sink contract, checked by driving sinks through real training runs."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traintel.records import Record, thaw
from traintel.sinks.base import RunContext, Sink
from traintel.sinks.memory import MemorySink

ReadBack = Callable[[Any], Sequence[Mapping[str, Any]]]

MAX_EMIT_SECONDS = 0.25
"""The longest a sink's ``emit``/``emit_many`` may take on the training thread (``check_sink``'s
``max_emit_seconds``): a slower back-end belongs on a thread of its own (``threaded``)."""


class SinkContractError(AssertionError):
    """A sink broke the contract; the message says how."""


@dataclass
class ContractResult:
    """What one contract run produced, for further assertions."""

    sink: Any
    records: list[Record]
    run_dir: Path
    rows: list[Mapping[str, Any]] = field(default_factory=list)


class _Probe:
    """Wrap a sink and log every call the fan-out makes, and the longest a delivery took on the
    training thread (a ``threaded`` sink's, on its own thread, do not count)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.name = sink.name
        self.threaded = getattr(sink, "threaded", False) is True
        self.calls: list[tuple[str, Any]] = []
        self.slowest = 0.0
        self._training = threading.get_ident()
        if callable(getattr(sink, "emit_many", None)):  # offer the batch path only when the sink has it
            self.emit_many = self._emit_many

    def open(self, context: RunContext) -> None:
        self.calls.append(("open", context))
        self.sink.open(context)

    def emit(self, record: Record) -> None:
        self.calls.append(("emit", record))
        started = time.perf_counter()
        try:
            self.sink.emit(record)
        finally:
            self._timed(started)

    def _emit_many(self, records: Sequence[Record]) -> None:
        self.calls.extend(("emit", r) for r in records)
        many: Callable[[Sequence[Record]], None] = getattr(self.sink, "emit_many")  # noqa: B009 - optional
        started = time.perf_counter()
        try:
            many(records)
        finally:
            self._timed(started)

    def _timed(self, started: float) -> None:
        if threading.get_ident() == self._training:
            self.slowest = max(self.slowest, time.perf_counter() - started)

    def close(self) -> None:
        self.calls.append(("close", None))
        self.sink.close()


def contract_config(run_dir: Path, run_id: str) -> dict[str, Any]:
    """A short run: 7 micro-batches (the last short), k=3, 2 epochs, every step emitted and
    delivered at once (so each step's records are one ``emit_many`` batch, deterministically),
    clipping on (so ``grad_norm`` is set), built-in sinks off."""
    return {
        "run": {"id": run_id, "dir": str(run_dir), "name": "sink-contract"},
        "trainer": {
            "max_epochs": 2,
            "accumulation_steps": 3,
            "optimizer": {"name": "sgd", "lr": 0.05},
            "grad_clip_norm": 10.0,
            "device": "cpu",
        },
        "telemetry": {"every": 1, "max_delay_seconds": 0},
        "sinks": {
            "json": {"enabled": False},
            "diagnostic": {"enabled": False},
            "prometheus": {"enabled": False},
        },
    }


def _contract_task() -> Any:
    import torch

    from traintel.task import Task

    g = torch.Generator().manual_seed(0)
    x = torch.randn(52, 4, generator=g)
    y = x @ torch.tensor([[0.5], [-1.0], [0.25], [2.0]]) + 0.1 * torch.randn(52, 1, generator=g)
    sizes = [8, 8, 8, 8, 8, 8, 4]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    train = [(x[a:b], y[a:b]) for a, b in itertools.pairwise(bounds)]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    return Task(model=model, loss_fn=torch.nn.functional.mse_loss, train_loader=train, val_loader=train[:2])


def _same(written: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or not isinstance(expected, float):
        return bool(thaw(written) == thaw(expected))
    if not math.isfinite(expected):
        return written is None or (
            isinstance(written, float) and (written == expected or math.isnan(expected))
        )
    return isinstance(written, int | float) and not isinstance(written, bool) and float(written) == expected


def _compare(
    rows: Sequence[Mapping[str, Any]], records: list[Record], events: Collection[str] | None
) -> None:
    pending: dict[str, list[Record]] = {}
    for r in records:
        pending.setdefault(r.event, []).append(r)
    counts = {e: sum(1 for row in rows if row.get("event") == e) for e in pending}
    for event in sorted(pending if events is None else events):
        produced = len(pending.get(event, []))
        if counts.get(event, 0) != produced:
            held = counts.get(event, 0)
            msg = f"read_back holds {held} {event} rows, but the run produced {produced} such records"
            raise SinkContractError(msg)
    for i, row in enumerate(rows):
        kind = str(row.get("event"))
        queue = pending.get(kind)
        if not queue:
            msg = f"read_back row {i} has event {kind!r}, but no such record is left to match it"
            raise SinkContractError(msg)
        record = queue.pop(0)
        fields = record.fields()
        for key, value in row.items():
            if key in fields and not _same(value, fields[key]):
                msg = f"row {i} ({kind}): {key} = {value!r}, but the record holds {fields[key]!r}"
                raise SinkContractError(msg)


def _check_calls(probe: _Probe, reference: MemorySink, run_id: str) -> None:
    kinds = [c[0] for c in probe.calls]
    if kinds.count("open") != 1 or kinds[0] != "open":
        msg = f"open must be called once, first; calls were {kinds[:3]}..."
        raise SinkContractError(msg)
    if kinds.count("close") != 1 or kinds[-1] != "close":
        msg = f"close must be called once, last; got {kinds.count('close')} close calls"
        raise SinkContractError(msg)
    context = probe.calls[0][1]
    if context.run_id != run_id:
        msg = f"open received run_id {context.run_id!r}, expected {run_id!r}"
        raise SinkContractError(msg)
    received = [c[1] for c in probe.calls if c[0] == "emit"]
    expected = reference.records
    if len(received) != len(expected) or any(a is not b for a, b in zip(received, expected, strict=False)):
        msg = f"the sink received {len(received)} records, the reference {len(expected)}, or in another order"
        raise SinkContractError(msg)


def check_sink(
    factory: Callable[[], Any],
    *,
    read_back: ReadBack | None = None,
    events: Collection[str] | None = None,
    runs: int = 2,
    base_dir: str | Path | None = None,
    resume: bool = True,
    ranks: str = "zero",
    max_emit_seconds: float = MAX_EMIT_SECONDS,
) -> list[ContractResult]:
    """Run ``runs`` short trainings, each with a fresh ``factory()`` sink, and assert the contract.

    ``read_back(sink)`` (after close) returns what the sink wrote as mappings with an
    ``event`` key and field values. ``events`` names the events the sink writes (default:
    all); for each, read_back must hold exactly one row per record, in order, and every
    field a row shares with its record must hold the identical value. No delivery may take
    longer than ``max_emit_seconds`` on the training thread (a ``threaded`` sink's run on its own).

    ``resume`` (on by default) then runs a first attempt that ends with a checkpoint and a resumed
    attempt in the same run directory, each with a fresh sink: the second is opened with
    ``attempt=1``, and read_back of it must hold the rows of both attempts (the sink appends, never
    overwrites). Turn it off for a sink that keeps nothing across processes (stdout, memory).
    ``ranks="all"`` (a sink meant for ``sinks.extra[].ranks: all``) also opens two sinks side by side,
    as ranks 0 and 1 of two in one run directory, and delivers a run's records to both: neither may
    fail, and read_back of each must hold its own records.

    Run directories go under ``base_dir`` (kept), or a temporary directory removed on return.
    Returns one ContractResult per run (the resumed attempt's last); raises SinkContractError on a
    breach.
    """
    if ranks not in ("zero", "all"):
        msg = f"ranks must be 'zero' or 'all', got {ranks!r}"
        raise ValueError(msg)
    results = []
    keep = contextlib.nullcontext(str(base_dir)) if base_dir is not None else None
    with keep or tempfile.TemporaryDirectory() as tmp:
        for n in range(runs):
            run_id = f"sink-contract-{n + 1}"
            run_dir = Path(tmp) / run_id
            config = contract_config(run_dir, run_id)
            results.append(
                _contract_run(factory, run_dir, run_id, config, read_back=read_back, events=events,
                              max_emit_seconds=max_emit_seconds)
            )  # fmt: skip
        if resume:
            results.append(
                _resumed(factory, Path(tmp) / "sink-contract-resume", read_back, events, max_emit_seconds)
            )
        if ranks == "all":
            _side_by_side(factory, Path(tmp) / "sink-contract-ranks", results[0].records, read_back, events)
    return results


def _contract_run(
    factory: Callable[[], Any],
    run_dir: Path,
    run_id: str,
    config: Mapping[str, Any],
    *,
    read_back: ReadBack | None,
    events: Collection[str] | None,
    max_emit_seconds: float,
    earlier: Sequence[Record] = (),
) -> ContractResult:
    """One run with a fresh sink, checked; ``earlier``: records of an earlier attempt in ``run_dir``
    that read_back must hold before this run's."""
    from traintel.errors import ConfigError
    from traintel.run.api import build
    from traintel.run.plugins import check_sink as has_interface

    sink = has_interface(factory(), "check_sink", "the factory")
    probe = _Probe(sink)
    reference = MemorySink("contract-reference")
    try:
        run = build(config, _contract_task(), sinks=[reference, probe])
    except ConfigError as exc:
        msg = f"the sink could not be opened{' on resume' if earlier else ''}: {exc}"
        raise SinkContractError(msg) from None
    end = run.run()
    if end.status != "completed":
        msg = f"the contract run did not complete: {end.status} ({end.reason})"
        raise SinkContractError(msg)
    errors = run.fanout.errors.get(sink.name, 0)
    if errors:
        msg = f"the sink raised {errors} time(s) during the run (the fan-out isolated it)"
        raise SinkContractError(msg)
    _check_calls(probe, reference, run_id)
    if probe.slowest > max_emit_seconds:
        msg = (
            f"a delivery took {probe.slowest:.2f} s on the training thread (the bound is "
            f"{max_emit_seconds:g} s): training waits for it; deliver on a thread of its own (threaded)"
        )
        raise SinkContractError(msg)
    try:
        sink.close()
    except Exception as exc:
        msg = f"a second close() raised {type(exc).__name__}: {exc}"
        raise SinkContractError(msg) from exc
    rows: list[Mapping[str, Any]] = []
    if read_back is not None:
        rows = list(read_back(sink))
        if not rows:
            msg = "read_back returned nothing: the sink wrote no record"
            raise SinkContractError(msg)
        try:
            _compare(rows, [*earlier, *reference.records], events)
        except SinkContractError as exc:
            if not earlier:
                raise
            msg = f"after a resume (attempt 1 in attempt 0's run directory), {exc}; did open() overwrite?"
            raise SinkContractError(msg) from None
    return ContractResult(sink=sink, records=reference.records, run_dir=run_dir, rows=rows)


def _resumed(
    factory: Callable[[], Any],
    run_dir: Path,
    read_back: ReadBack | None,
    events: Collection[str] | None,
    max_emit_seconds: float,
) -> ContractResult:
    """Attempt 0 trains one epoch and checkpoints it; attempt 1, a fresh sink in the same run
    directory, resumes it for the second: read_back must hold both attempts' rows."""
    run_id = "sink-contract-resume"
    config = contract_config(run_dir, run_id)
    config["checkpoint"] = {"every_epochs": 1}
    config["trainer"] = {**config["trainer"], "max_epochs": 1}
    first = _contract_run(factory, run_dir, run_id, config, read_back=None, events=events,
                          max_emit_seconds=max_emit_seconds)  # fmt: skip
    config["trainer"] = {**config["trainer"], "max_epochs": 2}
    config["run"] = {**config["run"], "resume": "auto"}
    return _contract_run(factory, run_dir, run_id, config, read_back=read_back, events=events,
                         max_emit_seconds=max_emit_seconds, earlier=first.records)  # fmt: skip


def _side_by_side(
    factory: Callable[[], Any],
    run_dir: Path,
    records: Sequence[Record],
    read_back: ReadBack | None,
    events: Collection[str] | None,
) -> None:
    """Ranks 0 and 1 of two, opened in one run directory and given the same run's records (each
    with its rank), as under torchrun with ``ranks: all``."""
    from traintel.run.plugins import check_sink as has_interface

    run_dir.mkdir(parents=True, exist_ok=True)
    sinks = [has_interface(factory(), "check_sink", "the factory") for _ in range(2)]
    given = [[dataclasses.replace(r, rank=rank, world_size=2) for r in records] for rank in range(2)]
    for rank, sink in enumerate(sinks):
        try:
            sink.open(RunContext(run_id="sink-contract-ranks", name="sink-contract", run_dir=run_dir,
                                 rank=rank, world_size=2))  # fmt: skip
        except Exception as exc:
            msg = f"rank {rank}'s sink could not be opened beside rank 0's: {type(exc).__name__}: {exc}"
            raise SinkContractError(msg) from None
    for rank, sink in enumerate(sinks):
        try:
            for record in given[rank]:
                sink.emit(record)
        except Exception as exc:
            msg = f"rank {rank}'s sink raised {type(exc).__name__}: {exc}"
            raise SinkContractError(msg) from None
        finally:
            sink.close()
    if read_back is not None:
        for rank, sink in enumerate(sinks):
            try:
                _compare(list(read_back(sink)), given[rank], events)
            except SinkContractError as exc:
                msg = f"beside rank 0, rank {rank}'s sink: {exc}"
                raise SinkContractError(msg) from None
