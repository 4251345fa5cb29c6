"""Build ``train.batch``, ``train.step`` and ``train.epoch`` records from the step output, once."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any

import torch
from ignite.engine import Engine, Events

from traintel.engine.step import StepOutput, Totals
from traintel.handlers.memory import rss_bytes
from traintel.records import BatchRecord, EpochRecord, Record, StepRecord, positional

Emit = Callable[[Record], None]
EmitMany = Callable[[Sequence[Record]], None]

_TOLERANCE_ULPS = 4.0
MAX_PENDING = 256
"""Emitted steps held at most before their records are delivered, whatever ``max_delay``."""


def scale_check(raw: float, loss: float, expected: float, eps: float) -> tuple[float | None, bool | None]:
    """Observed loss/raw_loss and whether it equals n_b/N_t within a few ulps of the loss dtype."""
    if not (math.isfinite(raw) and math.isfinite(loss)):
        return None, None
    if raw == 0.0:
        return None, loss == 0.0
    observed = loss / raw
    return observed, abs(observed - expected) <= _TOLERANCE_ULPS * eps * max(expected, eps)


class TrainTelemetry:
    """Turn every Nth optimizer step into records and every epoch into an epoch record.

    The update step keeps the running totals (a float64 loss-sum tensor on the model's
    device, integer counts) and each step's detached loss tensors. An emitted step is
    noted with its wall-clock time; its tensors become Python floats only when its records
    are built, and that one float goes to every sink. The step record's loss is the sum of
    those s_b floats, left to right in float64: the same value as the step's ``WindowLoss``
    tensor, without a second transfer.

    Records are built and delivered in batches: the steps noted since the last delivery
    are converted with one ``stack().tolist()`` (one device-to-host transfer for all of
    them) and their records go to the sinks together, once ``max_delay`` seconds have
    passed since the last delivery, or ``MAX_PENDING`` steps are waiting, or the epoch or
    run ends. Each record keeps its own step's time. Building and rendering many records
    in one go costs far less than interleaving the same work with the training step,
    and a step slower than ``max_delay`` is delivered as soon as it ends. ``max_delay=0``
    delivers every emitted step at once.
    """

    def __init__(
        self,
        emit: Emit,
        run_id: str,
        *,
        every: int = 1,
        diagnostics: bool = True,
        max_delay: float = 0.05,
        emit_many: EmitMany | None = None,
    ) -> None:
        if every < 1:
            msg = f"every must be >= 1, got {every}"
            raise ValueError(msg)
        if not max_delay >= 0:
            msg = f"max_delay must be >= 0, got {max_delay}"
            raise ValueError(msg)
        self.emit = emit
        self.emit_many: EmitMany = emit_many if emit_many is not None else self._emit_each
        self.run_id = run_id
        self.every = every
        self.diagnostics = diagnostics
        self.max_delay = max_delay
        self._pending: list[tuple[StepOutput, float]] = []
        self._delivered = 0.0

    def _emit_each(self, records: Sequence[Record]) -> None:
        for record in records:
            self.emit(record)

    def attach(self, engine: Engine) -> None:
        """Note every Nth step; deliver at epoch end (before the epoch record) and at COMPLETED.

        A run that ends otherwise (terminated mid-epoch, failed) is delivered by ``flush``
        from whatever ends it: ``RunLifecycle`` calls it before ``run.end``.
        """
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.note_step)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.emit_epoch)
        engine.add_event_handler(Events.COMPLETED, self._flush_on_stop)

    def note_step(self, engine: Engine) -> None:
        """ITERATION_COMPLETED: keep every Nth step's output; deliver when due."""
        if engine.state.iteration % self.every:
            return
        now = time.time()
        pending = self._pending
        pending.append((_state(engine).step_output, now))
        if len(pending) >= MAX_PENDING or now - self._delivered >= self.max_delay:
            self.flush()

    def flush(self) -> None:
        """Build the records of the waiting steps and deliver them, in step order."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        values = _to_floats(pending)
        rss = rss_bytes() if self.diagnostics else None
        records: list[Record] = []
        memory: dict[torch.device, dict[str, int | None]] = {}
        at = 0
        for out, when in pending:
            device = out.losses[0].device
            mem = memory.get(device)
            if mem is None and self.diagnostics:
                mem = memory[device] = _memory(rss, device)
            at = self._build(out, when, values=values, at=at, memory=mem, into=records)
        self._delivered = time.time()
        self.emit_many(records)

    def _build(
        self,
        out: StepOutput,
        when: float,
        *,
        values: list[float],
        at: int,
        memory: dict[str, int | None] | None,
        into: list[Record],
    ) -> int:
        """Append the step's batch records and step record; returns the index of the next step's values.

        ``values`` holds, per step, its raw losses, then its scaled losses, then its grad norm
        when it has one (see ``_to_floats``).
        """
        k = len(out.counts)
        run_id, epoch, total = self.run_id, out.epoch, out.items
        before = out.step if out.skipped else out.step - 1
        batches = out.window.batches_per_epoch
        first = out.window.first_batch
        dtype = out.losses[0].dtype
        eps, dtype_name = _dtype_facts(dtype)
        for i in range(k):
            raw, loss = values[at + i], values[at + k + i]
            n = out.counts[i]
            scale = n / total if n else 0.0
            diag: Any = _NO_DIAGNOSTICS
            if memory is not None:
                observed, ok = scale_check(raw, loss, scale, eps)
                fields = {
                    "expected_loss_scale": scale,
                    "observed_loss_scale": observed,
                    "scale_ok": ok,
                    "accumulation_position": i + 1,
                    "window_items": total,
                    "loss_dtype": dtype_name,
                }
                fields.update(memory)
                diag = MappingProxyType(fields)
            # BatchRecord's fields in declaration order: run_id, time, diagnostics, epoch, batch,
            # batches, step, items, raw_loss, loss, loss_scale, window_size
            into.append(
                _batch_record(run_id, when, diag, epoch, first + i, batches, before, n, raw, loss, scale, k)
            )
        # the step loss: the float64 sum, left to right, of the s_b of micro-batches with items,
        # as WindowLoss sums them on the device (float32 values are exact as Python floats)
        step_loss = 0.0
        first_term = True
        for i in range(k):
            if out.counts[i]:
                step_loss = values[at + k + i] if first_term else step_loss + values[at + k + i]
                first_term = False
        at += 2 * k
        grad_norm = None
        if out.grad_norm is not None:
            grad_norm = values[at]
            at += 1
        # StepRecord's: run_id, time, diagnostics, epoch, step, items, items_total, window_size,
        # loss, lr, grad_norm, skipped
        into.append(
            _step_record(
                run_id, when, _NO_DIAGNOSTICS, epoch, out.step, total, out.items_total, k, step_loss, out.lr,
                grad_norm, out.skipped,
            )
        )  # fmt: skip
        return at

    def emit_epoch(self, engine: Engine) -> None:
        """EPOCH_COMPLETED: deliver the waiting steps, then the epoch record."""
        self.flush()
        totals: Totals = _state(engine).totals
        duration = engine.state.times.get(Events.EPOCH_COMPLETED.name) or 0.0
        items = totals.items
        self.emit(
            EpochRecord(
                run_id=self.run_id,
                time=time.time(),
                epoch=engine.state.epoch,
                step=totals.run_steps,
                loss=float(totals.loss_sum) / items if items else math.nan,
                items=items,
                items_total=totals.run_items,
                batches=totals.batches,
                steps=totals.steps,
                duration_seconds=duration,
                items_per_second=items / duration if duration > 0 else 0.0,
            )
        )

    def _flush_on_stop(self, _engine: Engine) -> None:
        self.flush()


_NO_DIAGNOSTICS: Any = MappingProxyType({})
_batch_record = positional(BatchRecord)
_step_record = positional(StepRecord)
_DTYPES: dict[torch.dtype, tuple[float, str]] = {}


def _dtype_facts(dtype: torch.dtype) -> tuple[float, str]:
    """Machine epsilon and short name of a loss dtype (cached: ``finfo`` is not free)."""
    facts = _DTYPES.get(dtype)
    if facts is None:
        facts = _DTYPES[dtype] = (torch.finfo(dtype).eps, str(dtype).removeprefix("torch."))
    return facts


def _to_floats(pending: list[tuple[StepOutput, float]]) -> list[float]:
    """Every waiting step's raw losses, scaled losses and grad norm (when present), in order, as
    Python floats: one stack and one device-to-host transfer for all of them."""
    parts: list[torch.Tensor] = []
    for out, _ in pending:
        parts += out.raw_losses
        parts += out.losses
        if out.grad_norm is not None:
            parts.append(out.grad_norm)
    values: list[float] = torch.stack(parts).tolist()
    return values


def _state(engine: Engine) -> Any:
    """Ignite's State with traintel's extra attributes (``step_output``, ``micro_batch``)."""
    return engine.state


def _memory(rss: int | None, device: torch.device) -> dict[str, int | None]:
    mem: dict[str, int | None] = {"rss_bytes": rss}
    if device.type == "cuda":
        mem["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated(device))
        mem["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return mem
