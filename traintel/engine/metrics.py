"""The task's evaluation metrics: Ignite ``Metric``s and torchmetrics ``Metric``s, fed each
validation batch, computed once per pass and reduced over the ranks by the metric itself."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from ignite.metrics import Metric as IgniteMetric


def metric_kind(metric: Any) -> str:
    """``ignite`` or ``torchmetrics``: how ``metric`` is fed (``update(output_transform((output,
    target)))`` or ``update(output, target)``); a TypeError for anything else."""
    if isinstance(metric, IgniteMetric):
        return "ignite"
    if any(c.__module__.split(".")[0] == "torchmetrics" for c in type(metric).__mro__) and all(
        callable(getattr(metric, a, None)) for a in ("update", "compute", "reset")
    ):
        return "torchmetrics"
    msg = f"must be an ignite.metrics.Metric or a torchmetrics.Metric, got {type(metric).__name__}"
    raise TypeError(msg)


class EvalMetrics:
    """The metrics of one evaluation pass, by name, in order.

    Each is reset when a pass starts, updated with every batch that has items (its output and
    targets, or what ``forward_loss`` returned and the batch), and computed when the pass ends:
    Ignite's metrics and torchmetrics both sum their states over the ranks of a torch.distributed
    run there (one collective each, on every rank in the same order), so a value covers every
    rank's validation items, uneven shards included.
    """

    def __init__(self, metrics: Mapping[str, Any], device: torch.device) -> None:
        self.metrics = dict(metrics)
        self.kinds = {name: metric_kind(m) for name, m in self.metrics.items()}
        for name, metric in self.metrics.items():
            if self.kinds[name] == "torchmetrics":
                metric.to(device)  # its states live where the batches are

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def update(self, output: Any, target: Any) -> None:
        for name, metric in self.metrics.items():
            if self.kinds[name] == "ignite":  # its output_transform, as Ignite applies it when attached
                metric.update(metric._output_transform((output, target)))
            else:
                metric.update(output, target)

    def compute(self) -> dict[str, float]:
        """Every metric's value as a float (NaN where a metric has nothing to compute on any rank);
        a metric that is not one number fails the run, naming it."""
        values: dict[str, float] = {}
        for name, metric in self.metrics.items():
            with warnings.catch_warnings():  # a rank whose share is empty computes the others' sum
                warnings.filterwarnings("ignore", message=".*compute.*before.*update", category=UserWarning)
                try:
                    value = metric.compute()
                except Exception as exc:
                    if type(exc).__name__ != "NotComputableError":
                        raise
                    value = math.nan  # Ignite's: no example on any rank
            values[name] = _number(name, value)
        return values


def _number(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            msg = f"metric {name!r} computed a tensor of shape {tuple(value.shape)}; it must be one number"
            raise TypeError(msg)
        return float(value.item())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    msg = f"metric {name!r} computed {type(value).__name__}; it must be one number"
    raise TypeError(msg)
