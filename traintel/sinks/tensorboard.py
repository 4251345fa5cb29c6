"""TensorBoard event files: every loss of the run as a scalar on the optimizer-step axis.

Enable it with ``sinks.extra: [{name: tensorboard, params: {log_dir: ..., flush_secs: ...}}]``
after ``pip install traintel[tensorboard]``. The values are the records' own floats (never
recomputed); TensorBoard's scalar summaries store them as float32, and each event's wall
time is the record's ``time``. Non-finite values are written as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from traintel.errors import ConfigError
from traintel.records import BatchRecord, EpochRecord, EvalRecord, MetricRecord, Record, StepRecord
from traintel.sinks.base import RunContext

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["TensorBoardSink"]


class TensorBoardSink:
    """Write ``train.batch``, ``train.step``, ``train.epoch`` and ``eval.epoch`` losses, and every
    metric, as scalars.

    The x axis is the optimizer step: a micro-batch is plotted at ``step + 1``, the step
    its gradient goes into; step, epoch and eval records at their ``step``. Tags:
    ``train/batch_loss``, ``train/batch_raw_loss``, ``train/batch_loss_scale``,
    ``train/step_loss``, ``train/lr``, ``train/grad_norm`` (when reported), ``train/grad_scale``
    (under fp16), ``train/<metric>`` for each of the task's training metrics, ``train/epoch_loss``,
    ``eval/loss`` and ``eval/<metric>`` for each of its evaluation metrics (``eval/<split>/...`` for a
    validation loader not named ``val``), and ``user/<name>`` for each value logged with ``Run.log``
    (a ``metric`` record). Other records are skipped.
    """

    name = "tensorboard"

    def __init__(self, *, log_dir: str | None = None, flush_secs: float = 10) -> None:
        """``log_dir`` defaults to ``<run dir>/tensorboard``; the files are flushed every ``flush_secs``."""
        if not flush_secs > 0:
            msg = f"flush_secs must be a positive number of seconds, got {flush_secs!r}"
            raise ValueError(msg)
        self.log_dir_param = log_dir
        self.flush_secs = flush_secs
        self.log_dir: Path | None = None
        """The directory the event file is written to, resolved in ``open``."""
        self._writer: SummaryWriter | None = None

    def open(self, context: RunContext) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "sinks.extra", "the tensorboard sink needs `pip install traintel[tensorboard]`"
            ) from None
        self.close()
        log_dir = context.run_dir / "tensorboard" if self.log_dir_param is None else Path(self.log_dir_param)
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                "sinks.extra", f"the tensorboard sink cannot create {str(log_dir)!r}: {exc.strerror}"
            ) from None
        self._writer = SummaryWriter(log_dir=str(log_dir), flush_secs=self.flush_secs)
        self.log_dir = log_dir

    def emit(self, record: Record) -> None:
        writer = self._writer
        if writer is None:
            msg = "TensorBoardSink.emit called before open (or after close)"
            raise RuntimeError(msg)
        t = record.time
        if isinstance(record, BatchRecord):
            step = record.step + 1
            writer.add_scalar("train/batch_loss", record.loss, step, walltime=t)
            writer.add_scalar("train/batch_raw_loss", record.raw_loss, step, walltime=t)
            writer.add_scalar("train/batch_loss_scale", record.loss_scale, step, walltime=t)
        elif isinstance(record, StepRecord):
            writer.add_scalar("train/step_loss", record.loss, record.step, walltime=t)
            writer.add_scalar("train/lr", record.lr, record.step, walltime=t)
            if record.grad_norm is not None:
                writer.add_scalar("train/grad_norm", record.grad_norm, record.step, walltime=t)
            if record.grad_scale is not None:
                writer.add_scalar("train/grad_scale", record.grad_scale, record.step, walltime=t)
            for name, value in record.metrics.items():
                writer.add_scalar(f"train/{name}", value, record.step, walltime=t)
        elif isinstance(record, EpochRecord):
            writer.add_scalar("train/epoch_loss", record.loss, record.step, walltime=t)
        elif isinstance(record, EvalRecord):
            prefix = "eval" if record.split == "val" else f"eval/{record.split}"
            writer.add_scalar(f"{prefix}/loss", record.loss, record.step, walltime=t)
            for name, value in record.metrics.items():
                writer.add_scalar(f"{prefix}/{name}", value, record.step, walltime=t)
        elif isinstance(record, MetricRecord):
            for name, value in record.metrics.items():
                writer.add_scalar(f"user/{name}", value, record.step, walltime=t)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()  # flushes first
