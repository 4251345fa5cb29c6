"""The update step: one optimizer step over one accumulation window, scaled by items."""

from __future__ import annotations

import logging
import math
import operator
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine

from traintel.engine.coordination import PEER_STOP_REASON, Coordinator
from traintel.engine.events import TraintelEvents
from traintel.engine.loss import WindowLoss, loss_scale
from traintel.engine.outputs import MicroBatchOutput, StepOutput
from traintel.engine.progress import Progress
from traintel.engine.state import TraintelState
from traintel.engine.windows import Window

Prepare = Callable[[Any, torch.device], Any]
"""``prepare(batch, device)``: the batch on the device, as ``(inputs, targets)`` for a ``loss_fn``."""
CountItems = Callable[[Any], int]
LossFn = Callable[[Any, Any], torch.Tensor]
ForwardLoss = Callable[[torch.nn.Module, Any], Any]
"""``forward_loss(model, batch)``: the batch's mean loss from a model that computes its own, as a
tensor or an object whose ``.loss`` is one (a Hugging Face ``ModelOutput``)."""
TrainMetric = Callable[[StepOutput], Any]
"""``fn(step_output)``: a training metric of one step on this rank, a one-element tensor computed on
the device from ``step_output.outputs`` (and its losses and counts), without reading it on the host."""

_log = logging.getLogger("traintel")

AUTOCAST: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""The autocast dtype of each reduced ``precision``; ``fp32`` runs without autocast."""


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (its state_dict keys have no prefix)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def default_prepare(batch: Any, device: torch.device) -> tuple[Any, Any]:
    """``(inputs, targets)`` moved to ``device``."""
    inputs, targets = batch
    return _to(inputs, device), _to(targets, device)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor) and value.device != device:
        return value.to(device, non_blocking=True)
    return value


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with its tensors moved to ``device``, through tuples (a named tuple keeps its type),
    lists and mappings (which come back as dicts); anything else as it is. The default ``prepare``
    of a ``forward_loss``: the batch is handed over whole, on the device."""
    if isinstance(value, torch.Tensor):
        return _to(value, device)
    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, list):
        return [to_device(item, device) for item in value]
    if isinstance(value, tuple):
        moved = [to_device(item, device) for item in value]
        return type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)
    return value


def loss_calls(
    model: torch.nn.Module,
    *,
    loss_fn: LossFn | None = None,
    forward_loss: ForwardLoss | None = None,
    prepare: Prepare | None = None,
) -> tuple[Prepare, Callable[[Any], torch.Tensor]]:
    """``(prepare, loss)``: how a batch becomes its mean loss, decided once for the task's callables.
    ``prepare(batch, device)`` puts the batch on the device (outside autocast); ``loss(prepared)``
    is mean_loss_b, the part that autocast wraps.

    With ``loss_fn``, ``prepare`` (default ``default_prepare``) gives ``(inputs, targets)`` and the
    loss is ``loss_fn(model(inputs), targets)``, or ``model(**inputs)`` when ``inputs`` is a mapping.
    With ``forward_loss``, ``prepare`` (default ``to_device``) gives the batch and the loss is
    ``forward_loss(model, batch)``: a tensor, or the ``.loss`` tensor of what it returns. Exactly one
    of the two must be given.
    """
    if loss_fn is not None and forward_loss is None:

        def output_loss(prepared: Any) -> torch.Tensor:
            inputs, targets = prepared
            return loss_fn(call_model(model, inputs), targets)

        return prepare or default_prepare, output_loss
    if forward_loss is not None and loss_fn is None:

        def own_loss(batch: Any) -> torch.Tensor:
            return _loss_tensor(forward_loss(model, batch))

        return prepare or to_device, own_loss
    msg = "give exactly one of loss_fn and forward_loss"
    raise TypeError(msg)


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping of keyword inputs, else ``model(inputs)``."""
    # a tensor, the common case, is told apart first: an ABC's isinstance costs 5 times more
    keywords = not isinstance(inputs, torch.Tensor) and isinstance(inputs, Mapping)
    return model(**inputs) if keywords else model(inputs)


def output_calls(
    model: torch.nn.Module, *, loss_fn: LossFn | None = None, forward_loss: ForwardLoss | None = None
) -> Callable[[Any], tuple[torch.Tensor, Any, Any]]:
    """For metrics: ``(mean loss, output, target)`` of a prepared batch (``loss_calls``'s): with
    ``loss_fn``, the model's output and the targets; with ``forward_loss``, what it returned (a
    Hugging Face ``ModelOutput`` with its logits) and the batch."""
    if loss_fn is not None:

        def with_output(prepared: Any) -> tuple[torch.Tensor, Any, Any]:
            inputs, targets = prepared
            output = call_model(model, inputs)
            return loss_fn(output, targets), output, targets

        return with_output
    if forward_loss is None:
        msg = "give exactly one of loss_fn and forward_loss"
        raise TypeError(msg)

    def own_output(batch: Any) -> tuple[torch.Tensor, Any, Any]:
        returned = forward_loss(model, batch)
        return _loss_tensor(returned), returned, batch

    return own_output


def _loss_tensor(value: Any) -> torch.Tensor:
    """What ``forward_loss`` returned, as the loss tensor; anything else fails the run naming it."""
    if isinstance(value, torch.Tensor):
        return value
    loss = getattr(value, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    got = _described(value)
    if hasattr(value, "loss"):
        got += f" whose .loss is {_described(loss)}"
    msg = f"forward_loss returned {got}; it must return the mean loss as a tensor or as a .loss tensor"
    raise TypeError(msg)


def _described(value: Any) -> str:
    """``None``, ``a float``, ``an Output``: what a value is, for a message."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def default_count_items(batch: Any) -> int:
    """The batch size: the first dimension of the targets."""
    targets = batch[1]
    return int(targets.shape[0]) if isinstance(targets, torch.Tensor) else len(targets)


class AccumulatingStep:
    """Ignite process function for one window of micro-batches.

    For a window of micro-batches of n_b items and N = sum n_b, each micro-batch
    contributes s_b = mean_loss_b * n_b / N to backward, so the accumulated gradient is
    the gradient of the window's item-weighted mean loss, whatever the batch sizes.
    mean_loss_b comes from ``micro_batch_loss``: ``loss_fn`` on the model's output, or the task's
    ``forward_loss`` for a model that computes its own (``loss_calls``; exactly one is given).

    A call runs four named steps, each a place to extend:

    1. ``count_items`` of every micro-batch, then ``window_items``: N, before any backward
       (the coordinator adds up the ranks' counts);
    2. ``run_micro_batch`` for each (told which is the last to run backward: the place for
       the gradient reduction that DDP puts off until then), whose ``micro_batch_loss`` is the one
       place mean_loss_b is computed, each followed by ``state.micro_batch``
       and ``MICRO_BATCH_COMPLETED``, or ``take_part`` when this rank has no items in a window that
       others have; then ``end_window``;
    3. ``optimizer_step`` (``clip_gradients``, ``OPTIMIZER_STEP_STARTED``, step, scheduler, clear), unless
       ``on_nonfinite="skip_step"`` and ``window_finite`` finds a NaN or infinite loss on some rank
       (then the gradients are cleared and the step is not taken);
    4. the window is added to ``progress`` and described by a ``StepOutput``, with the task's
       training metrics (``metric_values``) when it gives any and the step's records are emitted.

    The bookkeeping adds no tensor operation beyond two detaches per micro-batch: the step
    loss is a ``WindowLoss``, summed when first read, and ``Progress`` adds windows to the
    epoch's loss sum in groups.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn | None,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        device: torch.device,
        forward_loss: ForwardLoss | None = None,
        prepare: Prepare | None = None,
        count_items: CountItems = default_count_items,
        grad_clip_norm: float | None = None,
        report_grad_norm: bool = False,
        precision: str = "fp32",
        grad_scaler: torch.amp.GradScaler | None = None,
        coordinator: Coordinator | None = None,
        on_nonfinite: str = "warn",
        train_metrics: Mapping[str, TrainMetric] | None = None,
        metrics_every: int = 1,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.forward_loss = forward_loss
        """The task's ``forward_loss(model, batch)`` (``model`` as given here: DDP's wrapper on a rank),
        when it gives one instead of ``loss_fn``."""
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        prepare_batch, self._loss = loss_calls(
            model, loss_fn=loss_fn, forward_loss=forward_loss, prepare=prepare
        )
        self.prepare = prepare_batch
        """``prepare(batch, device)``: the task's, or the default for its loss (``loss_calls``)."""
        self.train_metrics = dict(train_metrics or {})
        """The task's training metrics by name, computed after every ``metrics_every``-th optimizer step
        (``metric_values``)."""
        self.metrics_every = metrics_every
        """``telemetry.every``: the steps whose records are emitted (the engine's iteration a multiple of
        it) are the only ones whose training metrics anyone reads, so only they compute them."""
        self._outputs: list[tuple[Any, Any]] | None = None
        """With training metrics, the window's ``(output, target)`` so far; None without (nothing kept)."""
        if self.train_metrics:
            with_output = output_calls(model, loss_fn=loss_fn, forward_loss=forward_loss)
            self._loss = self._keeping_outputs(with_output)
        self.count_items = count_items
        self.grad_clip_norm = grad_clip_norm
        self.report_grad_norm = report_grad_norm
        self.precision = precision
        self._autocast = AUTOCAST.get(precision)
        self.grad_scaler = grad_scaler
        """``precision="fp16"``'s loss scale: backward runs on the scaled s_b, the gradients are
        unscaled before clipping, and a step with overflowing gradients is skipped (``optimizer_step``).
        The losses the step returns and records are never scaled."""
        self.coordinator = coordinator if coordinator is not None else Coordinator()
        """What this process agrees on with the other ranks (itself alone by default)."""
        self.on_nonfinite = on_nonfinite
        """``trainer.on_nonfinite``; only ``skip_step`` changes the step (``stop`` is the telemetry's)."""
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._inner = unwrapped(model)
        """The model inside a wrapper (DDP): the evaluator switches it to eval mode, not the wrapper."""
        self._zero = torch.zeros((), dtype=torch.float64, device=device)
        self.progress = Progress(device)
        """The run's position; ``create_trainer`` puts this object on ``state.progress``."""
        self._events_on: weakref.ref[Engine] | None = None
        """The engine last found to have ``TraintelEvents`` registered (they cannot be unregistered)."""

    def _keeping_outputs(
        self, with_output: Callable[[Any], tuple[torch.Tensor, Any, Any]]
    ) -> Callable[[Any], torch.Tensor]:
        """The loss of a prepared batch that also keeps its ``(output, target)`` for the training metrics."""
        kept: list[tuple[Any, Any]] = []
        self._outputs = kept

        def loss(prepared: Any) -> torch.Tensor:
            value, output, target = with_output(prepared)
            kept.append((output, target))
            return value

        return loss

    def metric_values(self, out: StepOutput) -> dict[str, torch.Tensor]:
        """Each training metric of the step ``out``, given the window's outputs (``out.outputs``),
        under ``no_grad``: a one-element tensor on the device, never read here. The outputs are let
        go of afterwards."""
        kept = self._outputs
        outputs = tuple(kept) if kept is not None else ()
        if kept is not None:
            kept.clear()
        view = out._replace(outputs=outputs)
        values: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, fn in self.train_metrics.items():
                values[name] = self._metric_tensor(name, fn(view))
        return values

    def _measured(self, engine: Engine, out: StepOutput) -> StepOutput:
        """``out`` with its training metrics when the step's records are emitted (its iteration a
        multiple of ``metrics_every``, as ``TrainTelemetry`` emits them); the outputs let go of."""
        if self._outputs is None:
            return out
        if emitted(engine, self.metrics_every):
            return out._replace(metrics=self.metric_values(out))
        self._outputs.clear()
        return out

    def _metric_tensor(self, name: str, value: Any) -> torch.Tensor:
        """A training metric's value as a 0-dim tensor on the device; anything but one number fails
        the run naming the metric."""
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.detach().reshape(())
            return value if value.device == self.device else value.to(self.device, non_blocking=True)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return torch.tensor(float(value), dtype=torch.float64, device=self.device)
        tensor = isinstance(value, torch.Tensor)
        got = f"a tensor of shape {tuple(value.shape)}" if tensor else _described(value)
        msg = f"train metric {name!r} returned {got}; it must return a one-element tensor"
        raise TypeError(msg)

    def fires(self, engine: Engine, event: TraintelEvents) -> bool:
        """Whether the step fires ``event`` on ``engine``. On a trainer from ``create_trainer``, only
        while a handler is attached to it (``TraintelEngine.listened``): nothing else observes it, and
        Ignite's ``fire_event`` costs about 9 us a call, which for the k+1 calls of a step is 5% of a
        small model's (``benchmarks/overhead.py``). On a plain Ignite ``Engine``, once it registered
        ``TraintelEvents`` (before that no handler can be attached, and ``fire_event`` would raise)."""
        listened = getattr(engine, "listened", None)
        if listened is not None:
            return event.name in listened
        known = self._events_on
        if known is not None and known() is engine:
            return True
        if all(engine.has_registered_events(e) for e in TraintelEvents):
            self._events_on = weakref.ref(engine)
            return True
        return False

    def count_window(self, batches: Sequence[Any]) -> tuple[int, ...]:
        """n_b of each micro-batch, from ``count_items``: an integer (a float such as 2.7 is never
        truncated) and not negative, else the run fails naming the value."""
        found: list[int] = []
        for batch in batches:
            n = self.count_items(batch)
            try:
                found.append(operator.index(n))
            except TypeError:
                msg = f"count_items returned {n!r} ({type(n).__name__}); it must return an integer"
                raise TypeError(msg) from None
        counts = tuple(found)
        if counts and min(counts) < 0:
            msg = f"count_items returned a negative count {min(counts)}"
            raise ValueError(msg)
        return counts

    def window_items(self, counts: Sequence[int]) -> int:
        """N, the items of the window every micro-batch's loss is scaled by: over all ranks, as the
        coordinator agrees (this process's own sum when it runs alone)."""
        return self.coordinator.agree(sum(counts)).items

    def take_part(self) -> None:
        """The window has items on other ranks but none here: join their gradient reduction without
        adding to the gradient. Nothing to do in a single process, where this cannot happen."""

    def micro_batch_loss(self, batch: Any) -> torch.Tensor:
        """mean_loss_b of ``batch`` as the loader gave it: ``prepare`` puts it on the device, then
        ``loss_fn`` on the model's output or the task's ``forward_loss`` runs, under autocast for
        ``precision`` bf16 or fp16. The one place the step computes a loss: override it to change how."""
        prepared = self.prepare(batch, self.device)
        if self._autocast is None:  # fp32 needs no context
            return self._loss(prepared)
        with torch.autocast(device_type=self.device.type, dtype=self._autocast):
            return self._loss(prepared)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, of the loss times the gradient scaler's factor under fp16: the one
        place the step runs backward (the factor never reaches a returned or recorded loss)."""
        if self.grad_scaler is None:
            loss.backward()
        else:
            self.grad_scaler.scale(loss).backward()

    def run_micro_batch(
        self, batch: Any, items: int, window_items: int, last: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, scale and backward one micro-batch; returns (mean_loss_b, s_b), detached.

        ``last``: the window's last micro-batch that runs backward (the place for a gradient
        reduction across ranks, which a subclass puts off until then). A micro-batch without items
        runs nothing: NaN stands for its missing mean, 0 for its share.
        """
        if not items:
            raw = torch.full((), math.nan, device=self.device)
            return raw, raw.new_zeros(())
        raw = self.micro_batch_loss(batch)
        loss = raw * loss_scale(items, window_items)
        self.backward(loss)
        return raw.detach(), loss.detach()

    def optimizer_step(self, engine: Engine) -> tuple[torch.Tensor | None, bool, float | None]:
        """Clip (or measure) the gradient norm, fire ``OPTIMIZER_STEP_STARTED``, step the optimizer
        and the scheduler, and clear the gradients; returns the pre-clip norm when computed, whether
        the step was taken, and the gradient scaler's factor the window's backward ran with (None
        without one). Under fp16 the gradients are unscaled first (clipping and the norm see their
        true values), and the scaler skips a step whose gradients overflowed: its scale then falls,
        which is how the skip is seen (the scaler's own check already waited for the device); the
        scheduler is not stepped for it."""
        scaler = self.grad_scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        grad_norm = self.clip_gradients()
        if self.fires(engine, TraintelEvents.OPTIMIZER_STEP_STARTED):
            engine.fire_event(TraintelEvents.OPTIMIZER_STEP_STARTED)
        taken, before = True, None
        if scaler is None:
            self.optimizer.step()
        else:
            before = scaler.get_scale()
            scaler.step(self.optimizer)
            scaler.update()
            taken = scaler.get_scale() >= before
        if taken and self.scheduler is not None:
            self.scheduler.step()
        self.clear_grads()
        return grad_norm, taken, before

    def clip_gradients(self) -> torch.Tensor | None:
        """The gradient norm before clipping, when ``grad_clip_norm`` clips to it or
        ``report_grad_norm`` asks for it (else None, and nothing computed)."""
        if self.grad_clip_norm is not None:
            return torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip_norm).detach()
        if self.report_grad_norm:
            return torch.nn.utils.clip_grad_norm_(self._params, math.inf).detach()
        return None

    def end_window(self, window_items: int) -> None:
        """After the window's micro-batches, before the optimizer step: nothing in one process (an
        FSDP rank runs the passes it owes the others here)."""

    def clear_grads(self) -> None:
        """Drop every gradient (``set_to_none``), without the profiler scope of ``zero_grad``."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def _begin_window(self, total: int, last: int) -> None:
        """Before the window's micro-batches: ``take_part`` when only other ranks have items (``last``
        < 0), then forget any outputs kept before (that part's, or a failed step's)."""
        if total and last < 0:
            self.take_part()
        if self._outputs:
            self._outputs.clear()

    def window_finite(self, losses: Sequence[torch.Tensor]) -> bool:
        """Whether the window's s_b are all finite on every rank (the coordinator agrees): one host
        sync, taken only under ``trainer.on_nonfinite=skip_step``. A micro-batch without items
        adds 0; a rank with no micro-batch in the window is finite."""
        local = bool(torch.isfinite(torch.stack(list(losses))).all()) if losses else True
        return self.coordinator.all_true(local)

    def __call__(self, engine: Engine, window: Window) -> torch.Tensor | WindowLoss:
        if not (self.model.training and self._inner.training):
            self.model.train()
        progress = self.progress
        epoch = engine.state.epoch
        progress.start_epoch(epoch)
        batches = window.batches
        counts = self.count_window(batches)
        total = self.window_items(counts)
        self.clear_grads()  # a failed step or a handler may have left gradients behind

        raws: list[torch.Tensor] = []
        losses: list[torch.Tensor] = []
        last = len(counts) - 1
        while last >= 0 and not counts[last]:
            last -= 1
        self._begin_window(total, last)
        fires = self.fires(engine, TraintelEvents.MICRO_BATCH_COMPLETED)
        for position, batch in enumerate(batches):
            n = counts[position]
            raw, loss = self.run_micro_batch(batch, n, total, position == last)
            raws.append(raw)
            losses.append(loss)
            _set_state(engine, "micro_batch", MicroBatchOutput(
                position + 1, window.first_batch + position, n, loss_scale(n, total), raw, loss
            ))  # fmt: skip
            if fires:
                engine.fire_event(TraintelEvents.MICRO_BATCH_COMPLETED)
        self.end_window(total)

        lr = float(self.optimizer.param_groups[0]["lr"])
        stepped = total > 0 and (self.on_nonfinite != "skip_step" or self.window_finite(losses))
        if stepped:
            grad_norm, stepped, scale = self.optimizer_step(engine)
        else:
            grad_norm = None
            scale = None if self.grad_scaler is None else self.grad_scaler.get_scale()
            if total:  # a non-finite loss under skip_step: drop its gradients, keep the parameters
                self.clear_grads()
                _log.warning(
                    "non-finite loss at step %d in epoch %d: optimizer step not taken "
                    "(trainer.on_nonfinite=skip_step)",
                    progress.run_steps + 1,
                    epoch,
                )
        losses_t = tuple(losses)
        progress.add_window(losses_t, len(counts), total, stepped=stepped)
        window_loss = WindowLoss(losses_t, counts, self._zero)
        out = StepOutput(
            epoch, progress.run_steps, window, total, counts, tuple(raws), losses_t, window_loss,
            progress.run_items, lr, grad_norm, not stepped, scale,
        )  # fmt: skip
        _set_state(engine, "step_output", self._measured(engine, out))
        if self.coordinator.last.stop:  # a rank was asked to stop: every rank ends after this same step
            if getattr(engine.state, "stop_reason", None) is None:
                _set_state(engine, "stop_reason", PEER_STOP_REASON)
            if not epochs_last_step(engine):  # that one ends after its epoch's end (create_trainer)
                engine.terminate()
        # Ignite stores this as state.output; a TraintelState sums it only when it is read
        return window_loss if isinstance(engine.state, TraintelState) else window_loss.resolve()


def _set_state(engine: Engine, name: str, value: Any) -> None:
    """Set a traintel attribute on the engine's state (declared on ``TraintelState``; a plain Ignite
    ``State`` takes it as an extra attribute)."""
    setattr(engine.state, name, value)


def emitted(engine: Engine, every: int) -> bool:
    """Whether the step just completed is one whose records are emitted (``telemetry.every``): the
    telemetry builds records of these steps only, and the step computes training metrics for them."""
    return engine.state.iteration % every == 0


def epochs_last_step(engine: Engine) -> bool:
    """Whether the step under way is its epoch's last (of a known epoch length)."""
    length = engine.state.epoch_length
    return length is not None and engine.state.iteration % length == 0
