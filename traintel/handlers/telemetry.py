"""Build ``train.batch``, ``train.step`` and ``train.epoch`` records from the step output, once."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import torch
from ignite.engine import Engine, Events

from traintel.engine.step import StepOutput, Totals
from traintel.handlers.memory import rss_bytes
from traintel.records import BatchRecord, EpochRecord, Record, StepRecord

Emit = Callable[[Record], None]

_TOLERANCE_ULPS = 4.0


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
    device, integer counts); tensors become Python floats only here, when a record is
    emitted, in one device-to-host transfer per emission, and that one float goes to
    every sink.
    """

    def __init__(self, emit: Emit, run_id: str, *, every: int = 1, diagnostics: bool = True) -> None:
        if every < 1:
            msg = f"every must be >= 1, got {every}"
            raise ValueError(msg)
        self.emit = emit
        self.run_id = run_id
        self.every = every
        self.diagnostics = diagnostics

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.emit_step)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.emit_epoch)

    def emit_step(self, engine: Engine) -> None:
        out: StepOutput = _state(engine).step_output
        micro = out.micro
        k = len(micro)
        tensors = [m.raw_loss for m in micro] + [m.loss for m in micro] + [out.loss]
        if out.grad_norm is not None:
            tensors.append(out.grad_norm)
        values = torch.stack(tensors).tolist()  # promoted to float64 (exact); the one host transfer
        now = time.time()
        before = out.step if out.skipped else out.step - 1
        rss = rss_bytes() if self.diagnostics else None
        eps = torch.finfo(micro[0].loss.dtype).eps
        for i, m in enumerate(micro):
            raw, loss = values[i], values[k + i]
            diag: Any = MappingProxyType({})
            if self.diagnostics:
                observed, ok = scale_check(raw, loss, m.scale, eps)
                diag = MappingProxyType(
                    {
                        "expected_loss_scale": m.scale,
                        "observed_loss_scale": observed,
                        "scale_ok": ok,
                        "accumulation_position": m.position,
                        "window_items": out.items,
                        "loss_dtype": str(m.loss.dtype).removeprefix("torch."),
                        **_memory(rss, m.loss.device),
                    }
                )
            self.emit(
                BatchRecord(
                    run_id=self.run_id,
                    time=now,
                    diagnostics=diag,
                    epoch=out.epoch,
                    batch=m.batch,
                    batches=out.window.batches_per_epoch,
                    step=before,
                    items=m.items,
                    raw_loss=raw,
                    loss=loss,
                    loss_scale=m.scale,
                    window_size=k,
                )
            )
        self.emit(
            StepRecord(
                run_id=self.run_id,
                time=now,
                epoch=out.epoch,
                step=out.step,
                items=out.items,
                items_total=out.items_total,
                window_size=k,
                loss=values[2 * k],
                lr=out.lr,
                grad_norm=values[2 * k + 1] if out.grad_norm is not None else None,
                skipped=out.skipped,
            )
        )

    def emit_epoch(self, engine: Engine) -> None:
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


def _state(engine: Engine) -> Any:
    """Ignite's State with traintel's extra attributes (``step_output``, ``micro_batch``)."""
    return engine.state


def _memory(rss: int | None, device: torch.device) -> dict[str, int | None]:
    mem: dict[str, int | None] = {"rss_bytes": rss}
    if device.type == "cuda":
        mem["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated(device))
        mem["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return mem
