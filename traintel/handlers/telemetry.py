"""Build ``train.batch``, ``train.step`` and ``train.epoch`` records from the step output, once."""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from ignite.engine import Engine, Events

from traintel.engine.coordination import Coordinator
from traintel.engine.loss import loss_scale
from traintel.engine.outputs import StepOutput
from traintel.engine.state import traintel_state
from traintel.engine.step import emitted
from traintel.errors import NonFiniteLoss
from traintel.handlers.rss import rss_bytes
from traintel.records import BatchRecord, EpochRecord, Record, StepRecord

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
    tensor, without a second transfer. The task's training metrics of a step (``StepOutput.metrics``)
    travel in the same transfer; under torch.distributed, each rank's value times its items in the
    window is summed in the same collective as the losses, so ``train.step`` carries their
    item-weighted mean over the ranks.

    Records are built and delivered in batches: the steps noted since the last delivery
    are converted with one ``stack().tolist()`` (one device-to-host transfer for all of
    them) and their records go to the sinks together, once ``max_delay`` seconds have
    passed since the last delivery, or ``MAX_PENDING`` steps are waiting, or the epoch or
    run ends. Each record keeps its own step's time. Building and rendering many records
    in one go costs far less than interleaving the same work with the training step,
    and a step slower than ``max_delay`` is delivered as soon as it ends. ``max_delay=0``
    delivers every emitted step at once.

    ``on_nonfinite="stop"`` (``trainer.on_nonfinite``) checks every step's loss when records are
    delivered, the steps not emitted too, without a host sync of its own, and ends the run with
    ``NonFiniteLoss`` after delivering them; other policies add no work here.
    """

    def __init__(
        self,
        emit: Emit,
        run_id: str,
        *,
        every: int = 1,
        max_delay: float = 0.05,
        emit_many: EmitMany | None = None,
        coordinator: Coordinator | None = None,
        attempt: int = 0,
        on_nonfinite: str = "warn",
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
        self.max_delay = max_delay
        self.coordinator = coordinator if coordinator is not None else Coordinator()
        """Under torch.distributed: when to deliver (rank 0's clock, agreed each step) and the
        sums over the ranks of the step and epoch losses, one collective per delivery."""
        self.rank = self.coordinator.rank
        self.world_size = self.coordinator.world_size
        self.attempt = attempt
        """The run's attempt (0, or n for its n-th resumption), copied into every record."""
        self._pending: list[tuple[StepOutput, float]] = []
        self._unemitted: list[StepOutput] | None = [] if on_nonfinite == "stop" else None
        """Under ``trainer.on_nonfinite=stop`` only: the steps since the last delivery that are not
        emitted, whose losses are checked at the next delivery too (None otherwise: no extra work)."""
        self._delivered = 0.0
        self._epoch_start: float | None = None
        """When the current epoch started in this attempt (``perf_counter``): a cut epoch's duration."""

    def _emit_each(self, records: Sequence[Record]) -> None:
        for record in records:
            self.emit(record)

    def attach(self, engine: Engine) -> None:
        """Note every Nth step; deliver at epoch end, before the epoch record.

        Whatever ends the run calls ``flush`` before ``run.end`` (``Run.run`` does), so the
        steps of a run that ends mid-epoch are delivered too.
        """
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.note_step)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.emit_epoch)

    def _epoch_started(self, _engine: Engine) -> None:
        self._epoch_start = time.perf_counter()

    def note_step(self, engine: Engine) -> None:
        """ITERATION_COMPLETED: keep every Nth step's output; deliver when due.

        In one process a delivery is due ``max_delay`` seconds after the previous one. Several
        ranks must deliver at the same step (the delivery sums over them): rank 0's clock asks,
        the next step's agreement carries it to every rank, and all deliver after that step.
        """
        coordinator = self.coordinator
        if emitted(engine, self.every):
            self._pending.append((_step_output(engine), time.time()))
        elif self._unemitted is not None:
            self._unemitted.append(_step_output(engine))
            if len(self._unemitted) >= MAX_PENDING:  # the same step on every rank: check them now
                self.flush()
        pending = self._pending
        if not pending:
            return
        due = time.time() - self._delivered >= self.max_delay
        if not coordinator.distributed:
            if due or len(pending) >= MAX_PENDING:
                self.flush()
            return
        if coordinator.last.deliver or len(pending) >= MAX_PENDING:
            self.flush()
        elif due:
            coordinator.deliver_requested = True  # rank 0's request counts; the others' are ignored

    def flush(self, extra: Sequence[float] = (), *, global_sums: bool = True) -> list[float]:
        """Build the records of the waiting steps and deliver them, in step order.

        The step losses (and ``extra``, e.g. the epoch's loss sum) are summed over the ranks in one
        collective; the sums are returned for ``extra``. ``global_sums=False`` (after a failure,
        when the other ranks may be gone) takes no collective: the per-rank batch records are
        delivered and the step records, whose values would be this rank's share only, are not.

        Under ``trainer.on_nonfinite=stop`` the steps that are not emitted have their losses taken
        in the same transfer and summed in the same collective; once the records are delivered, a
        step whose global loss is not finite raises ``NonFiniteLoss`` naming the first such step
        (the same step on every rank, from the same sums).
        """
        pending, self._pending = self._pending, []
        unemitted: Sequence[StepOutput] = ()
        if self._unemitted is not None:
            unemitted, self._unemitted = self._unemitted, []
        values, unemitted_losses = _to_floats(pending, unemitted)
        rss = rss_bytes() if pending else None
        memory: dict[torch.device, dict[str, int | None]] = {}
        batches: list[list[Record]] = []
        for (out, when), step_values in zip(pending, values, strict=True):
            device = out.losses[0].device if out.losses else None
            if device is not None and device not in memory:
                memory[device] = _memory(rss, device)
            mem = memory[device] if device is not None else {}
            batches.append(self._batch_records(out, when, step_values, memory=mem))
        shares = [_share(out.counts, v.losses) for (out, _), v in zip(pending, values, strict=True)]
        checks = [_share(out.counts, losses) for out, losses in zip(unemitted, unemitted_losses, strict=True)]
        distributed = self.coordinator.distributed
        weighted = (  # one rank's training metrics are the step's own
            [w for (out, _), v in zip(pending, values, strict=True) for w in _weighted(out, v.metrics)]
            if distributed
            else []
        )
        sums = [*shares, *checks, *weighted, *extra]
        if global_sums:
            sums = self.coordinator.sum_floats(sums)
        elif pending and distributed:
            logging.getLogger("traintel").warning(
                "%d step records not delivered: their losses need the other ranks", len(pending)
            )
        step_losses, check_losses, metric_sums, extra_sums = _split(
            sums, len(shares), len(checks), len(weighted), len(extra)
        )
        step_records = global_sums or not distributed
        delivery: list[Record] = []
        metric_floats = iter(metric_sums)
        for (out, when), records, step_loss, step_values in zip(
            pending, batches, step_losses, values, strict=True
        ):
            delivery += records
            if step_records:
                metrics = step_values.metrics
                if distributed:  # the item-weighted mean over the ranks
                    metrics = {name: _mean(next(metric_floats), out.items) for name in metrics}
                delivery.append(self._step_record(out, when, step_loss, step_values.grad_norm, metrics))
        self._delivered = time.time()
        if delivery:
            self.emit_many(delivery)
        if self._unemitted is not None and global_sums:
            steps = [out for out, _ in pending] + list(unemitted)
            losses = step_losses + check_losses
            bad = [out.step for out, loss in zip(steps, losses, strict=True) if not math.isfinite(loss)]
            if bad:
                raise NonFiniteLoss(min(bad))
        return extra_sums

    def _batch_records(
        self, out: StepOutput, when: float, values: _StepValues, *, memory: dict[str, int | None]
    ) -> list[Record]:
        """The step's batch records, from its losses as floats (``values``)."""
        k = len(out.counts)
        run_id, epoch, total = self.run_id, out.epoch, out.items
        before = out.step if out.skipped else out.step - 1
        batches = out.window.batches_per_epoch
        first = out.window.first_batch
        records: list[Record] = []
        if k:
            eps, dtype_name = _dtype_facts(out.losses[0].dtype)
        for i, (n, raw, loss) in enumerate(zip(out.counts, values.raw_losses, values.losses, strict=True)):
            scale = loss_scale(n, total)
            observed, ok = scale_check(raw, loss, scale, eps)
            fields: dict[str, Any] = {
                "expected_loss_scale": scale,
                "observed_loss_scale": observed,
                "scale_ok": ok,
                "accumulation_position": i + 1,
                "window_items": total,
                "loss_dtype": dtype_name,
            }
            fields.update(memory)
            records.append(
                BatchRecord(
                    run_id=run_id, time=when, diagnostics=MappingProxyType(fields), rank=self.rank,
                    world_size=self.world_size, attempt=self.attempt, epoch=epoch, batch=first + i,
                    batches=batches, step=before, items=n, raw_loss=raw, loss=loss, loss_scale=scale,
                    window_size=k,
                )
            )  # fmt: skip
        return records

    def _step_record(
        self, out: StepOutput, when: float, loss: float, grad_norm: float | None, metrics: dict[str, float]
    ) -> StepRecord:
        return StepRecord(
            run_id=self.run_id, time=when, rank=self.rank, world_size=self.world_size, attempt=self.attempt,
            epoch=out.epoch, step=out.step, items=out.items, items_total=out.items_total,
            window_size=len(out.counts), loss=loss, lr=out.lr, grad_norm=grad_norm, skipped=out.skipped,
            grad_scale=out.grad_scale, metrics=MappingProxyType(metrics) if metrics else _NO_METRICS,
        )  # fmt: skip

    def emit_epoch(self, engine: Engine, *, cut: bool = False) -> None:
        """EPOCH_COMPLETED: deliver the waiting steps, then the epoch record (summed over the ranks
        in the same collective as the steps' losses). ``cut``: the record of an epoch the step
        limit ended part-way (``state.epoch_cut``), timed from its start in this attempt."""
        progress = traintel_state(engine).progress
        loss_sum, batches = self.flush([float(progress.loss_sum), float(progress.batches)])
        if cut:
            started = self._epoch_start
            duration = time.perf_counter() - started if started is not None else 0.0
        else:
            duration = engine.state.times.get(Events.EPOCH_COMPLETED.name) or 0.0
        items = progress.items
        self.emit(
            EpochRecord(
                run_id=self.run_id,
                time=time.time(),
                rank=self.rank,
                world_size=self.world_size,
                attempt=self.attempt,
                epoch=engine.state.epoch,
                step=progress.run_steps,
                loss=loss_sum / items if items else math.nan,
                items=items,
                items_total=progress.run_items,
                batches=int(batches),
                steps=progress.steps,
                duration_seconds=duration,
                items_per_second=items / duration if duration > 0 else 0.0,
            )
        )


_NO_METRICS: Mapping[str, float] = MappingProxyType({})


def _weighted(out: StepOutput, metrics: Mapping[str, float]) -> list[float]:
    """Each of this rank's training metrics of the step times its items in the window (0 for a rank
    without items, whatever its value): summed over the ranks, then divided by the window's items."""
    items = sum(out.counts)
    return [value * items if items else 0.0 for value in metrics.values()]


def _mean(weighted_sum: float, items: int) -> float:
    """The item-weighted mean over the ranks from its sum (NaN for a window without items)."""
    return weighted_sum / items if items else math.nan


def _share(counts: Sequence[int], losses: Sequence[float]) -> float:
    """This rank's share of a step loss: the float64 sum, left to right, of the s_b of micro-batches
    with items, as ``WindowLoss`` sums them on the device (float32 values are exact as floats)."""
    share = 0.0
    first_term = True
    for n, loss in zip(counts, losses, strict=True):
        if n:
            share = loss if first_term else share + loss
            first_term = False
    return share


_NO_STEP_OUTPUT = "ITERATION_COMPLETED without a step output: the trainer's update step is not traintel's"


def _step_output(engine: Engine) -> StepOutput:
    """The step just completed (``state.step_output``); a RuntimeError when there is none."""
    out = traintel_state(engine).step_output
    if out is None:
        raise RuntimeError(_NO_STEP_OUTPUT)
    return out


_DTYPES: dict[torch.dtype, tuple[float, str]] = {}


def _dtype_facts(dtype: torch.dtype) -> tuple[float, str]:
    """Machine epsilon and short name of a loss dtype (cached: ``finfo`` is not free)."""
    facts = _DTYPES.get(dtype)
    if facts is None:
        facts = _DTYPES[dtype] = (torch.finfo(dtype).eps, str(dtype).removeprefix("torch."))
    return facts


@dataclass(frozen=True, slots=True)
class _StepValues:
    """One emitted step's tensors as Python floats."""

    raw_losses: list[float]
    """mean_loss_b of each micro-batch."""
    losses: list[float]
    """s_b of each micro-batch."""
    grad_norm: float | None
    metrics: dict[str, float]
    """This rank's training metrics of the step."""


def _to_floats(
    pending: Sequence[tuple[StepOutput, float]], unemitted: Sequence[StepOutput] = ()
) -> tuple[list[_StepValues], list[list[float]]]:
    """Every waiting step's values (``_StepValues``), and the scaled losses of each ``unemitted``
    step, as Python floats: one stack and one device-to-host transfer for all of them."""
    parts: list[torch.Tensor] = []
    for out, _ in pending:
        parts += out.raw_losses
        parts += out.losses
        if out.grad_norm is not None:
            parts.append(out.grad_norm)
        parts += out.metrics.values()
    for out in unemitted:
        parts += out.losses
    floats: Iterator[float] = iter(torch.stack(parts).tolist() if parts else [])  # in the order above
    values = [
        _StepValues(
            raw_losses=_take(floats, len(out.raw_losses)),
            losses=_take(floats, len(out.losses)),
            grad_norm=None if out.grad_norm is None else next(floats),
            metrics=dict(zip(out.metrics, _take(floats, len(out.metrics)), strict=True)),
        )
        for out, _ in pending
    ]
    return values, [_take(floats, len(out.losses)) for out in unemitted]


def _take(floats: Iterator[float], n: int) -> list[float]:
    """The next ``n`` values."""
    return list(itertools.islice(floats, n))


def _split(values: Sequence[float], *sizes: int) -> list[list[float]]:
    """``values`` cut into consecutive parts of the given sizes (which add up to its length)."""
    if len(values) != sum(sizes):
        msg = f"{len(values)} values do not split into parts of {sizes}"
        raise ValueError(msg)
    floats = iter(values)
    return [_take(floats, n) for n in sizes]


def _memory(rss: int | None, device: torch.device) -> dict[str, int | None]:
    """Process memory for the self-check records (and the device's, on CUDA)."""
    mem: dict[str, int | None] = {"rss_bytes": rss}
    if device.type == "cuda":
        mem["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated(device))
        mem["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return mem
