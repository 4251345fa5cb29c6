"""How far a run has got: the one object that saving and restoring a run's position needs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


class EpochLoss:
    """The epoch's sum of per-item losses, a float64 tensor on the device (no host sync).

    A window adds ``N_t * sum of its s_b``. Windows are added in groups, with a few tensor
    operations per ``FOLD_EVERY`` windows instead of one or more per window (next to a small
    model's step, four tiny kernels cost about 18 us); reading ``value`` adds the waiting ones
    first.
    """

    FOLD_EVERY = 64

    __slots__ = ("_sum", "_waiting")

    def __init__(self, zero: torch.Tensor) -> None:
        self._sum = zero.clone()
        self._waiting: list[tuple[Sequence[torch.Tensor], int]] = []

    @property
    def value(self) -> torch.Tensor:
        self.fold()
        return self._sum

    def add(self, losses: Sequence[torch.Tensor], items: int) -> None:
        """Count a window's s_b (the loss of a micro-batch without items is 0) with weight N_t."""
        if not losses:  # this rank had no micro-batch in the window; the other ranks did
            return
        self._waiting.append((losses, items))
        if len(self._waiting) >= self.FOLD_EVERY:
            self.fold()

    def fold(self) -> None:
        """Add the waiting windows: per distinct N_t, ``N_t * sum of their s_b`` in float64."""
        waiting = self._waiting
        if not waiting:
            return
        self._waiting = []
        by_items: dict[int, list[torch.Tensor]] = {}
        for losses, items in waiting:
            by_items.setdefault(items, []).extend(losses)
        for items, losses in by_items.items():
            self._sum.add_(torch.stack(losses).sum(dtype=torch.float64), alpha=items)

    def state_dict(self) -> dict[str, Any]:
        """The folded sum and the windows still waiting, on the CPU, without folding them: the
        groups are added the same way whether or not a checkpoint was taken in between, so a
        resumed epoch's loss has the same bits as an uninterrupted one's."""
        return {
            "sum": self._sum.detach().cpu().clone(),
            "waiting": [(torch.stack(list(losses)).detach().cpu(), items) for losses, items in self._waiting],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        total = state.get("sum")
        if not isinstance(total, torch.Tensor) or total.numel() != 1:
            msg = f"progress 'loss' sum must be a one-element tensor, got {type(total).__name__}"
            raise ValueError(msg)
        device = self._sum.device
        waiting: list[tuple[Sequence[torch.Tensor], int]] = []
        for losses, items in state.get("waiting", []):
            if not isinstance(losses, torch.Tensor) or type(items) is not int:
                msg = "progress 'loss' waiting windows must be (tensor, int) pairs"
                raise ValueError(msg)
            waiting.append((tuple(losses.to(device).unbind()), items))
        self._sum = total.reshape(()).to(dtype=torch.float64, device=device).clone()
        self._waiting = waiting


class Progress:
    """The run's position: the current epoch's partial counts and loss sum, and the run's totals.

    The update step adds each window; the trainer starts a new epoch's counts at
    ``EPOCH_STARTED`` (an epoch already under way, as restored by ``load_state_dict``, keeps
    its counts). ``state_dict()`` holds plain integers and float64 CPU tensors, so it
    round-trips through ``torch.save``/``torch.load(weights_only=True)``.
    """

    __slots__ = ("batches", "epoch", "items", "loss", "run_items", "run_steps", "steps", "windows")

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.epoch = 0
        """The epoch the counts below belong to (1-based; 0 before the first)."""
        self.windows = 0
        """Windows done in this epoch, stepped or skipped."""
        self.batches = 0
        """Micro-batches done in this epoch."""
        self.steps = 0
        """Optimizer steps taken in this epoch."""
        self.items = 0
        """Items trained on in this epoch."""
        self.loss = EpochLoss(torch.zeros((), dtype=torch.float64, device=device))
        """The epoch's partial sum of per-item losses."""
        self.run_steps = 0
        """Optimizer steps taken since the run started."""
        self.run_items = 0
        """Items trained on since the run started."""

    @property
    def loss_sum(self) -> torch.Tensor:
        """The epoch's sum of per-item losses so far (float64, on the device)."""
        return self.loss.value

    def start_epoch(self, epoch: int) -> None:
        """Begin ``epoch`` with zero counts, unless these counts already belong to it."""
        if epoch == self.epoch:
            return
        self.epoch = epoch
        self.windows = self.batches = self.steps = self.items = 0
        self.loss = EpochLoss(self.loss.value.new_zeros(()))

    def add_window(
        self, losses: Sequence[torch.Tensor], micro_batches: int, items: int, *, stepped: bool = True
    ) -> None:
        """Count one window of ``micro_batches`` with ``items`` items; a window with none was skipped.

        ``stepped=False``: its optimizer step was not taken (a non-finite loss under
        ``trainer.on_nonfinite=skip_step``): the window and its micro-batches count, but not as
        a step, and neither its items nor its losses (so the epoch loss stays finite).
        """
        self.windows += 1
        self.batches += micro_batches
        if items and stepped:
            self.items += items
            self.run_items += items
            self.steps += 1
            self.run_steps += 1
            self.loss.add(losses, items)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "windows": self.windows,
            "batches": self.batches,
            "steps": self.steps,
            "items": self.items,
            "loss": self.loss.state_dict(),
            "run_steps": self.run_steps,
            "run_items": self.run_items,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()``; a missing or mistyped entry is a ValueError naming it."""
        counts = {}
        for key in ("epoch", "windows", "batches", "steps", "items", "run_steps", "run_items"):
            value = state.get(key)
            if type(value) is not int or value < 0:
                msg = f"progress {key!r} must be an integer >= 0, got {value!r}"
                raise ValueError(msg)
            counts[key] = value
        loss = state.get("loss")
        if not isinstance(loss, Mapping):
            msg = f"progress 'loss' must be a mapping, got {type(loss).__name__}"
            raise ValueError(msg)
        self.loss.load_state_dict(loss)
        for key, value in counts.items():
            setattr(self, key, value)
