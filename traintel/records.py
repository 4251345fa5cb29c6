"""The immutable records that handlers build once and every sink receives unchanged.

Each record is a frozen, slotted dataclass: a sink that tries to change one gets
``dataclasses.FrozenInstanceError``. ``fields()`` returns the record's public fields
as a new dict (the console view); ``diagnostics`` holds extras only the diagnostic
file shows. Every float in a record is a plain Python float taken once from the
tensor that went to ``backward()``; sinks format it, never recompute it.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

SCHEMA_VERSION = "1.5.0"
"""Semantic version of the record fields; a field's meaning or type never changes within a major.

1.1.0 added ``rank`` and ``world_size`` to every record (a 1.0.0 line has neither and comes
from rank 0 of a one-process job). 1.2.0 added ``attempt`` to every record (an older line has
none and comes from a run's first attempt) and ``resumed_from_step`` and ``items_total`` to
``run.start``, for runs resumed from a checkpoint. 1.3.0 added ``grad_scale`` to ``train.step``
(an older line has none: no gradient scaler), ``split`` to ``eval.epoch`` (an older line has
none: the task's ``val_loader``, ``val``) and ``optimizer`` and ``scheduler`` (their classes) to
``run.start``. 1.4.0 added ``metrics`` to ``train.step`` (the task's training metrics; an older line
has none: ``{}``) and the ``metric`` record (values logged with ``Run.log``). 1.5.0 added ``strategy``
to ``run.start`` (an older line has none: ``ddp`` under torchrun, else null) and the ``checkpoint``
record (a checkpoint complete on every rank)."""

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def freeze(value: Any) -> Any:
    """A read-only deep copy: dicts become mappingproxies, lists become tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A plain copy of a frozen value: mappings become dicts, tuples and lists become lists (as JSON
    and other written forms hold them)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [thaw(v) for v in value]
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """Fields common to every record."""

    event: ClassVar[str] = "record"
    level: ClassVar[str] = "info"

    run_id: str
    """Id of the run that produced the record."""
    time: float
    """Wall-clock time, Unix seconds (UTC): when the optimizer step ended for batch and step records,
    otherwise when the record was built."""
    diagnostics: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, compare=False)
    """Extras for the diagnostic file only (self-checks, memory)."""
    rank: int = 0
    """This process's rank in the job, 0 without torch.distributed."""
    world_size: int = 1
    """Processes in the job."""
    attempt: int = 0
    """0 for the run's first attempt, n for its n-th resumption from a checkpoint."""

    @property
    def schema_version(self) -> str:
        return SCHEMA_VERSION

    def fields(self) -> dict[str, Any]:
        """The record's public fields: ``run_id``, ``schema_version``, ``rank``, ``world_size``,
        ``attempt``, then the event's own fields in declaration order; without ``time`` and
        ``diagnostics``."""
        names, values = layout(type(self))
        out: dict[str, Any] = {"run_id": self.run_id, "schema_version": SCHEMA_VERSION}
        out.update(zip(names, values(self), strict=True))
        return out


_LAYOUTS: dict[type[Record], tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]]]] = {}


def layout(cls: type[Record]) -> tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]]]:
    """The public field names of ``cls`` after ``run_id`` and a getter of their values as one tuple.

    The names are in dataclass field order, so the base fields ``rank``, ``world_size`` and
    ``attempt`` come first, then the event's own fields (a line's order: ..., schema_version, rank,
    world_size, attempt, ...).
    """
    found = _LAYOUTS.get(cls)
    if found is not None:
        return found
    skip = {"run_id", "time", "diagnostics"}
    names = tuple(
        f.name for f in dataclasses.fields(cls) if f.name not in skip and not f.name.startswith("_")
    )
    getter = operator.attrgetter(*names) if len(names) > 1 else _single(names)
    found = _LAYOUTS[cls] = (names, getter)
    return found


def _single(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """A getter for zero or one names that still returns a tuple (``attrgetter`` of one name does not)."""
    if not names:
        return lambda _record: ()
    get = operator.attrgetter(names[0])
    return lambda record: (get(record),)


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchRecord(Record):
    """``train.batch``: one micro-batch's contribution to an optimizer step."""

    event: ClassVar[str] = "train.batch"

    epoch: int
    batch: int
    """1-based index of the micro-batch in its epoch."""
    batches: int | None
    """Micro-batches per epoch, when the loader has a length."""
    step: int
    """Optimizer steps completed before this micro-batch's window (its gradient goes into step+1)."""
    items: int
    """n_b: items in this micro-batch."""
    raw_loss: float
    """mean_loss_b: the task's mean loss over the micro-batch."""
    loss: float
    """s_b = raw_loss * n_b / N_t: exactly the value given to backward()."""
    loss_scale: float
    """n_b / N_t."""
    window_size: int
    """Micro-batches in this accumulation window (k, or r for the last window of an epoch)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StepRecord(Record):
    """``train.step``: one optimizer step."""

    event: ClassVar[str] = "train.step"

    epoch: int
    step: int
    """Optimizer steps completed, including this one (unchanged when skipped)."""
    items: int
    """N_t: items in the window."""
    items_total: int
    """Items processed since the run started, including this window."""
    window_size: int
    loss: float
    """Sum of the window's s_b: the objective this step minimised."""
    lr: float
    """Learning rate of the first parameter group used by this step."""
    grad_norm: float | None
    """Global gradient norm before clipping, when clipping or reporting is on."""
    skipped: bool
    """True when no optimizer step was taken: the window held no items (N_t = 0: no backward), its
    loss was not finite under ``trainer.on_nonfinite=skip_step``, or its gradients overflowed under
    ``trainer.precision=fp16``."""
    grad_scale: float | None = None
    """The gradient scaler's factor this step's backward ran with under ``trainer.precision: fp16``
    (``loss`` never includes it); None without a scaler."""
    metrics: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    """The task's training metrics of this step by name (``Task.train_metrics``), as an item-weighted
    mean over the ranks; empty when it has none."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PassRecord(Record):
    """Fields shared by the records of one pass over a loader."""

    epoch: int
    step: int
    """Optimizer steps completed at the end of the pass."""
    loss: float
    """Item-weighted mean: sum of all per-item losses / items."""
    items: int
    batches: int
    duration_seconds: float
    items_per_second: float


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochRecord(PassRecord):
    """``train.epoch``: one pass over the training loader (evaluation excluded from its duration)."""

    event: ClassVar[str] = "train.epoch"

    items_total: int
    """Items processed since the run started."""
    steps: int
    """Optimizer steps taken in this epoch."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalRecord(PassRecord):
    """``eval.epoch``: one pass over a validation loader."""

    event: ClassVar[str] = "eval.epoch"

    split: str = "val"
    """The name of the validation loader the pass was over (``val`` for the task's ``val_loader``)."""
    metrics: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    """The task's evaluation metrics over this pass, by name (``Task.metrics``), reduced over the
    ranks; empty when it has none."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStartRecord(Record):
    """``run.start``: the resolved configuration summary."""

    event: ClassVar[str] = "run.start"

    name: str
    run_dir: str
    device: str
    config: Mapping[str, Any]
    """Resolved config, secrets redacted."""
    metrics_url: str | None
    """Where the Prometheus exporter serves, when enabled."""
    backend: str | None = None
    """The torch.distributed backend (``gloo``, ``nccl``); None in a single process."""
    strategy: str | None = None
    """How the ranks hold the model (``trainer.distributed.strategy``): ``ddp`` (each a whole copy) or
    ``fsdp`` (each a shard); None in a single process."""
    restart_count: int = 0
    """``TORCHELASTIC_RESTART_COUNT``: how often torchrun restarted the workers."""
    resumed_from_step: int | None = None
    """The optimizer step of the checkpoint this attempt continues from; None for a fresh start."""
    items_total: int = 0
    """Items trained on before this attempt started, from the checkpoint; 0 for a fresh start."""
    optimizer: str
    """The class of the optimizer the run steps (``torch.optim.adamw.AdamW``): ``trainer.optimizer``'s,
    or the task's own, when ``config``'s ``trainer.optimizer`` is not used."""
    scheduler: str | None = None
    """The class of the learning-rate scheduler, the task's own or ``trainer.scheduler``'s; None for
    a constant rate."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunEndRecord(Record):
    """``run.end``: how the run ended."""

    event: ClassVar[str] = "run.end"

    status: str
    """``completed``, ``terminated`` or ``failed``."""
    reason: str
    """Why: ``max_epochs``, ``stopped by EarlyStopping (patience N)`` or ``stopped by a handler``
    (completed), the signal (terminated), or the exception's one-line summary (failed)."""
    epoch: int
    step: int
    items_total: int
    duration_seconds: float

    @property
    def level(self) -> str:  # type: ignore[override]
        return "error" if self.status == "failed" else "info"


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricRecord(Record):
    """``metric``: values logged from the user's own code with ``Run.log``, this rank's own."""

    event: ClassVar[str] = "metric"

    epoch: int
    """The trainer's epoch when logged (0 before the first)."""
    step: int
    """The optimizer step the values belong to: ``Run.log``'s ``step``, by default the optimizer steps
    completed when logged."""
    metrics: Mapping[str, float]
    """The values by name."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointRecord(Record):
    """``checkpoint``: a checkpoint complete on every rank, after the records of the steps it covers."""

    event: ClassVar[str] = "checkpoint"

    step: int
    """The optimizer step it holds (for a best checkpoint, its evaluation's)."""
    epoch: int
    """The trainer's epoch when it was taken."""
    reason: str
    """Why it was taken: ``every_steps``, ``every_epochs``, ``signal``, ``max_steps``, or ``best``
    (``checkpoint.best``, a better evaluation)."""
    size_bytes: int
    """What every rank wrote of it, in all: state files, manifests excluded, and the model and
    optimizer's files."""
    write_seconds: float
    """On this rank, from its start until this rank's part was on disk with its manifest."""
    stall_seconds: float
    """How long training waited for it on this rank: the whole write, or, written in the background
    (``checkpoint.async``), the copy of the state and any wait for the write to end."""
    background: bool
    """Whether it was written in the background."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkErrorRecord(Record):
    """``sink.error``: a sink raised; reported once per sink, the others go on."""

    event: ClassVar[str] = "sink.error"
    level: ClassVar[str] = "warning"

    sink: str
    error: str
    """The first exception's type and message."""


RECORD_TYPES: tuple[type[Record], ...] = (
    BatchRecord,
    StepRecord,
    EpochRecord,
    EvalRecord,
    RunStartRecord,
    RunEndRecord,
    MetricRecord,
    CheckpointRecord,
    SinkErrorRecord,
)
