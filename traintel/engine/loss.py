"""The scale of a micro-batch's loss and the deferred loss of one optimizer step."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def loss_scale(items: int, window_items: int) -> float:
    """n_b / N: the share of a micro-batch of ``items`` in a window of ``window_items``.

    The one place this division is made: the update step multiplies the micro-batch's mean
    loss by it before ``backward()``, and every record and self-check reports the same
    value. A micro-batch without items has scale 0.0 (it runs no backward).
    """
    return items / window_items if items else 0.0


class WindowLoss:
    """The objective of one optimizer step: the float64 sum, left to right, of the window's s_b
    (micro-batches with items only; 0.0 for a window without any).

    Summed on first ``resolve()``, which ``state.output`` and ``StepOutput.loss`` call: a
    step whose loss nobody reads costs no tensor operation for it. The telemetry sums the
    same s_b as Python floats in the same order, which gives the same float64 value.
    """

    __slots__ = ("_counts", "_losses", "_value", "_zero")

    def __init__(self, losses: Sequence[torch.Tensor], counts: Sequence[int], zero: torch.Tensor) -> None:
        self._losses = losses
        self._counts = counts
        self._zero = zero
        self._value: torch.Tensor | None = None

    def resolve(self) -> torch.Tensor:
        value = self._value
        if value is None:
            for v, n in zip(self._losses, self._counts, strict=True):  # float64 + float32: exact terms
                if n:
                    value = v.double() if value is None else value + v
            value = self._value = self._zero.clone() if value is None else value
        return value
