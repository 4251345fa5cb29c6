"""The sink protocol: what a sink receives, when, and what it may not do.

A sink is a small object with one job. traintel calls ``open(context)`` once before
the first record, ``emit(record)`` once per record in order, and ``close()`` at run
end (always, and more than once is harmless). A sink may also define
``emit_many(records)``: per-step records arrive in batches, and the fan-out then hands
over the whole batch in one call (otherwise it calls ``emit`` for each, in order).
``close()`` gets ``DEFAULT_CLOSE_SECONDS`` (or the sink's own ``close_timeout`` attribute, when
it bounds its close itself) before the run abandons it and reports it, so a sink that hangs
on the way out cannot hold the process.
Records are immutable and already hold every value; a sink formats and delivers
them, and never computes a metric or reads the engine. A sink that raises is isolated
by the fan-out: the failure is counted, reported once as a ``sink.error`` record, and
training goes on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from traintel.records import Record

DEFAULT_CLOSE_SECONDS = 2.0
"""How long a run waits for a sink's ``close()`` that does not say (``close_timeout``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunContext:
    """What a sink learns about the run when it is opened."""

    run_id: str
    name: str
    run_dir: Path
    config: Mapping[str, Any] = field(default_factory=dict)
    """Resolved config, secrets redacted."""
    rank: int = 0
    """This process's rank under torch.distributed (0 in a single process). A plug-in is opened on
    rank 0 only, unless its ``sinks.extra`` entry says ``ranks: all``: then on every rank, and a
    file sink names its file by the rank."""
    world_size: int = 1
    """Processes in the job."""
    attempt: int = 0
    """0 for a run's first attempt; n for its n-th resumption from a checkpoint. The run directory
    and its files then exist already: a file sink appends to them (no second header), and a tracker
    continues the same run. The records of the steps after ``resumed_from_step`` that the previous
    attempt delivered before it ended come again, with the same values."""
    resumed_from_step: int | None = None
    """The optimizer step of the checkpoint this attempt continues from; None for a first attempt."""


@runtime_checkable
class Sink(Protocol):
    """A destination for records."""

    name: str
    """Short, unique name used in metrics labels and error reports."""

    def open(self, context: RunContext) -> None:
        """Acquire resources (files, sockets); raise ConfigError for bad settings."""

    def emit(self, record: Record) -> None:
        """Deliver one record; must not block training for long."""

    def close(self) -> None:
        """Flush and release resources; idempotent."""
