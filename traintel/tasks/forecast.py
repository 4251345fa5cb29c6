"""A synthetic time-series forecasting task generated in-process.

Each sample is ``context`` past values of a noisy sum of two sines with random
frequency, phase and amplitude; the target is the next ``horizon`` values. The
default sizes give 32 training micro-batches per epoch (the last one short), so
with k=3 every epoch ends with a partial window of 2.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, TensorDataset

from traintel.engine.outputs import StepOutput
from traintel.errors import ConfigError
from traintel.task import Task


def _series(n: int, length: int, generator: torch.Generator, noise: float) -> torch.Tensor:
    t = torch.arange(length, dtype=torch.float32)
    freq = torch.rand(n, 2, 1, generator=generator) * 0.25 + 0.02
    phase = torch.rand(n, 2, 1, generator=generator) * 2 * math.pi
    amp = torch.rand(n, 2, 1, generator=generator) + 0.5
    clean = (amp * torch.sin(freq * t + phase)).sum(dim=1)
    return clean + noise * torch.randn(n, length, generator=generator)


def make_dataset(n: int, context: int, horizon: int, seed: int, noise: float) -> TensorDataset:
    """``n`` (context, horizon) pairs, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    series = _series(n, context + horizon, g, noise)
    return TensorDataset(series[:, :context].contiguous(), series[:, context:].contiguous())


def make_task(
    *,
    train_samples: int = 1000,
    val_samples: int = 250,
    batch_size: int = 32,
    context: int = 24,
    horizon: int = 4,
    hidden: int = 64,
    noise: float = 0.05,
    seed: int = 0,
    shuffle: bool = True,
    metrics: bool = False,
) -> Task:
    """An MLP forecaster over synthetic series; MSE loss (mean over items).

    ``seed`` fixes the data and the shuffling; weights come from torch's global
    generator, which traintel seeds from ``run.seed`` before calling the factory.
    ``metrics`` adds the mean absolute error of the forecasts as a training metric (``mae`` in
    ``train.step``) and as an evaluation metric (Ignite's ``MeanAbsoluteError``, ``mae`` in
    ``eval.epoch``).
    """
    for key, value, low in (
        ("train_samples", train_samples, 1),
        ("val_samples", val_samples, 0),
        ("batch_size", batch_size, 1),
        ("context", context, 1),
        ("horizon", horizon, 1),
        ("hidden", hidden, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"task.params.{key}", f"must be an integer >= {low}, got {value!r}")
    if not isinstance(noise, int | float) or noise < 0 or not math.isfinite(noise):
        raise ConfigError("task.params.noise", f"must be a finite number >= 0, got {noise!r}")
    if not isinstance(metrics, bool):
        raise ConfigError("task.params.metrics", f"must be true or false, got {metrics!r}")
    model = torch.nn.Sequential(
        torch.nn.Linear(context, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, horizon),
    )
    train = make_dataset(train_samples, context, horizon, seed, noise)
    loader_gen = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=shuffle, generator=loader_gen)
    val_loader = None
    if val_samples:
        val = make_dataset(val_samples, context, horizon, seed + 1, noise)
        val_loader = DataLoader(val, batch_size=batch_size)
    task = Task(
        model=model, loss_fn=torch.nn.functional.mse_loss, train_loader=train_loader, val_loader=val_loader
    )
    if metrics:
        from ignite.metrics import MeanAbsoluteError

        task.train_metrics = {"mae": train_mae}
        task.metrics = {"mae": MeanAbsoluteError(output_transform=_flat)} if val_loader is not None else None
    return task


def _flat(output: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forecasts and targets as one value each: Ignite's MAE then averages over every value, as
    ``train_mae`` does (over samples it would add up each sample's horizon)."""
    forecast, target = output
    return forecast.flatten(), target.flatten()


def train_mae(out: StepOutput) -> torch.Tensor:
    """The mean absolute error of the step's forecasts over its items and horizon, on the device."""
    errors = [(forecast - target).abs().sum() for forecast, target in out.outputs]
    values = sum(target.numel() for _, target in out.outputs)
    return torch.stack(errors).sum() / values if values else torch.full((), math.nan)
