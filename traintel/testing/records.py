"""Record builders for sink tests: one record with fixed, plausible values (time ``T0``, run id
``r1``, rank 0 of 1, attempt 0) that a test overrides where it matters (``attempt=1`` for a resumed
run's records), and ``run_context(run_dir)``, the matching ``RunContext``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from traintel.records import (
    BatchRecord,
    CheckpointRecord,
    EpochRecord,
    EvalRecord,
    MetricRecord,
    Record,
    RunEndRecord,
    StepRecord,
)
from traintel.sinks.base import RunContext

T0 = 1_764_000_000.25
"""The builders' record time: 2025-11-24T16:00:00.250000Z."""


def run_context(run_dir: Path, **overrides: Any) -> RunContext:
    """A ``RunContext`` for run ``r1`` named ``demo`` in ``run_dir``."""
    return RunContext(**{"run_id": "r1", "name": "demo", "run_dir": run_dir, **overrides})


def batch_record(**overrides: Any) -> BatchRecord:
    """A ``train.batch`` record: micro-batch 2 of 10 in epoch 1, 4 items, raw loss 0.75 scaled by 1/3
    to 0.25 (values chosen so that ``loss == raw_loss * loss_scale`` holds exactly)."""
    fields: dict[str, Any] = {
        "run_id": "r1", "time": T0, "epoch": 1, "batch": 2, "batches": 10, "step": 0, "items": 4,
        "raw_loss": 0.75, "loss": 0.25, "loss_scale": 1 / 3, "window_size": 3,
    }  # fmt: skip
    return BatchRecord(**{**fields, **overrides})


def step_record(**overrides: Any) -> StepRecord:
    """A ``train.step`` record: step 1 of epoch 1 over 12 items, one second after ``T0``."""
    fields: dict[str, Any] = {
        "run_id": "r1", "time": T0 + 1, "epoch": 1, "step": 1, "items": 12, "items_total": 12,
        "window_size": 3, "loss": 0.6875, "lr": 0.001, "grad_norm": None, "skipped": False,
        "grad_scale": None,
    }  # fmt: skip
    return StepRecord(**{**fields, **overrides})


def epoch_record(**overrides: Any) -> EpochRecord:
    """A ``train.epoch`` record: epoch 1, one step, 12 items in 2 seconds, two seconds after ``T0``."""
    fields: dict[str, Any] = {
        "run_id": "r1", "time": T0 + 2, "epoch": 1, "step": 1, "loss": 0.5, "items": 12, "batches": 3,
        "duration_seconds": 2.0, "items_per_second": 6.0, "items_total": 12, "steps": 1,
    }  # fmt: skip
    return EpochRecord(**{**fields, **overrides})


def eval_record(**overrides: Any) -> EvalRecord:
    """An ``eval.epoch`` record: epoch 1, 8 items in 2 batches, two seconds after ``T0``."""
    fields: dict[str, Any] = {
        "run_id": "r1", "time": T0 + 2, "epoch": 1, "step": 1, "loss": 0.625, "items": 8, "batches": 2,
        "duration_seconds": 0.5, "items_per_second": 16.0, "split": "val",
    }  # fmt: skip
    return EvalRecord(**{**fields, **overrides})


def metric_record(**overrides: Any) -> MetricRecord:
    """A ``metric`` record: one value logged at step 1 of epoch 1, two and a half seconds after ``T0``."""
    fields: dict[str, Any] = {
        "run_id": "r1",
        "time": T0 + 2.5,
        "epoch": 1,
        "step": 1,
        "metrics": {"val_bleu": 31.25},
    }
    return MetricRecord(**{**fields, **overrides})


def checkpoint_record(**overrides: Any) -> CheckpointRecord:
    """A ``checkpoint`` record: step 1 of epoch 1 (``every_steps``), 4096 bytes written in a quarter of a
    second in the foreground (training waited for all of it), two and three quarter seconds after ``T0``."""
    fields: dict[str, Any] = {
        "run_id": "r1", "time": T0 + 2.75, "step": 1, "epoch": 1, "reason": "every_steps",
        "size_bytes": 4096, "write_seconds": 0.25, "stall_seconds": 0.25, "background": False,
    }  # fmt: skip
    return CheckpointRecord(**{**fields, **overrides})


def end_record(**overrides: Any) -> RunEndRecord:
    """A ``run.end`` record: completed after epoch 1 (``max_epochs``), three seconds after ``T0``."""
    fields: dict[str, Any] = {
        "run_id": "r1", "time": T0 + 3, "status": "completed", "reason": "max_epochs", "epoch": 1,
        "step": 1, "items_total": 12, "duration_seconds": 3.0,
    }  # fmt: skip
    return RunEndRecord(**{**fields, **overrides})


_BUILDERS: dict[str, Callable[..., Record]] = {
    "train.batch": batch_record,
    "train.step": step_record,
    "train.epoch": epoch_record,
    "eval.epoch": eval_record,
    "metric": metric_record,
    "checkpoint": checkpoint_record,
    "run.end": end_record,
}


def make_record(event: str, **overrides: Any) -> Record:
    """The builder of ``event`` (``train.batch``, ``train.step``, ``train.epoch``, ``eval.epoch``,
    ``metric``, ``checkpoint`` or ``run.end``) called with ``overrides``."""
    builder = _BUILDERS.get(event)
    if builder is None:
        msg = f"event must be one of {sorted(_BUILDERS)}, got {event!r}"
        raise ValueError(msg)
    return builder(**overrides)
