"""Tiny float64 tasks: micro-batches, a model and a loss that fails on cue."""

from __future__ import annotations

from collections.abc import Callable

import torch


def make_batches(
    sizes: list[int], features: int = 3, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches of the given sizes, float64, from a fixed linear-plus-noise problem."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, features, generator=g, dtype=torch.float64)
        y = x.sum(dim=1, keepdim=True) * 0.5 + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
        out.append((x, y))
    return out


def loss_failing_at(call: int, message: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """MSE that raises ``RuntimeError(message)`` at its ``call``-th use (a failure mid-run)."""
    calls = 0

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == call:
            raise RuntimeError(message)
        return torch.nn.functional.mse_loss(out, y)

    return loss_fn


def make_model(features: int = 3, seed: int = 0) -> torch.nn.Module:
    """A two-layer float64 MLP with fixed initial weights."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(features, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
