"""One rank of an FSDP2 run: the update step over a model sharded with ``fully_shard``.

Every rank scales its micro-batches by the window's items over all ranks (N, from the
coordinator's one ``all_reduce``), as under DDP. FSDP's reduce-scatter would average the ranks'
gradients (divide their sum by the world size); ``shard`` sets its divide factor to 1 with sum-only
reductions, so each rank's shard of the gradient is the plain sum over ranks and no factor is
folded anywhere. Gradient sync is off for every micro-batch of a window but its last pass: one
reduce-scatter per sharded module per optimizer step.

Each forward and backward of a sharded module gathers its parameters from every rank, so every
rank runs the same number of passes in a window: as many as the rank with the most micro-batches
there. A rank with fewer (a shorter shard, the epoch's last window) or with a micro-batch of no
items runs a pass of zero weight on a batch it has already seen. Evaluation gathers the whole model
once (``evaluating``), so that ranks with uneven validation shards need no matching passes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from traintel.engine.ddp import DistributedStep

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
"""The dtypes ``trainer.distributed.fsdp.mixed_precision`` names."""


def shard(
    model: torch.nn.Module,
    classes: Sequence[str],
    *,
    reshard_after_forward: bool = True,
    mixed_precision: tuple[str, str] | None = None,
) -> torch.nn.Module:
    """``fully_shard`` each module of ``classes`` (by class name, its own or a base's), innermost
    first, then the root; every sharded module reduces its gradients as a plain sum. ``classes``
    naming no module raises ``LookupError`` with the index of the first such name.
    ``mixed_precision``: ``(param_dtype, reduce_dtype)`` as ``DTYPES`` names them."""
    policy = MixedPrecisionPolicy()
    if mixed_precision is not None:
        params, reduce = mixed_precision
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[params], reduce_dtype=DTYPES[reduce])
    found = [False] * len(classes)
    chosen = []
    for module in model.modules():
        names = {c.__name__ for c in type(module).__mro__}
        hits = [i for i, name in enumerate(classes) if name in names]
        for i in hits:
            found[i] = True
        if hits and module is not model:
            chosen.append(module)
    if not all(found):
        raise LookupError(found.index(False))
    for module in reversed(chosen):  # modules() lists a parent before its children: innermost first
        fully_shard(module, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, reshard_after_forward=reshard_after_forward, mp_policy=policy)  # in place
    for unit in sharded(model):
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return model


def sharded(model: torch.nn.Module) -> list[FSDPModule]:
    """The modules of ``model`` that ``fully_shard`` made units, the root first."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def evaluating(model: torch.nn.Module, reshard_after_forward: bool) -> Iterator[None]:
    """Gather every sharded module's parameters once and keep them until the block ends, so that
    the forwards inside make no collective: the ranks may run different numbers of them (uneven
    validation shards). Costs the whole model's parameters in memory while it lasts."""
    units = sharded(model)
    root = units[0] if units else None
    for unit in units:
        unit.unshard()
        if unit is not root:
            unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            if unit is not root:
                unit.set_reshard_after_forward(reshard_after_forward, recurse=False)


class FullyShardedStep(DistributedStep):
    """``AccumulatingStep`` on one rank of an FSDP2 run: ``model`` is the sharded root (``shard``).

    ``run_micro_batch`` turns gradient sync on for the window's last pass only; ``end_window`` adds
    the passes of zero weight this rank owes (see the module docstring). The gradient norm is that
    of the whole gradient, from the sum of the squares of every rank's shards (``clip_gradients``).
    """

    k: int = 1
    """Micro-batches per window (``trainer.accumulation_steps``)."""
    most_batches: int | None = None
    """The most micro-batches any rank has in an epoch; each window runs as many passes as the rank
    with the most micro-batches in it has. None: every window runs ``k``."""

    _passes = 0
    """Passes run in the current window."""
    _due = 0
    """Passes the current window runs on every rank."""

    def count_window(self, batches: Sequence[Any]) -> tuple[int, ...]:
        counts = super().count_window(batches)
        if self.example is None:
            self.example = next((b for b, n in zip(batches, counts, strict=True) if n), None)
        self._passes = 0
        first = self.progress.windows * self.k  # the window's place in its epoch
        self._due = self.k if self.most_batches is None else max(0, min(self.k, self.most_batches - first))
        return counts

    def run_micro_batch(
        self, batch: Any, items: int, window_items: int, last: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not window_items:  # no rank has items: no rank runs a pass
            return super(DistributedStep, self).run_micro_batch(batch, items, window_items, last)
        self._next_pass()
        if items:
            return super(DistributedStep, self).run_micro_batch(batch, items, window_items, last)
        self.zero_pass()
        raw = torch.full((), math.nan, device=self.device)
        return raw, raw.new_zeros(())

    def take_part(self) -> None:
        """Nothing before the window: ``end_window`` runs its passes."""

    def end_window(self, window_items: int) -> None:
        while window_items and self._passes < self._due:
            self._next_pass()
            self.zero_pass()

    def _next_pass(self) -> None:
        self._passes += 1
        root: FSDPModule = self.model  # type: ignore[assignment]
        root.set_requires_gradient_sync(self._passes >= self._due)

    def clip_gradients(self) -> torch.Tensor | None:
        """The whole gradient's norm (clipped to ``grad_clip_norm``): one ``all_reduce`` of the
        sum of the squares of this rank's shards."""
        if self.grad_clip_norm is None and not self.report_grad_norm:
            return None
        shards = [_local(p.grad) for p in self._params if p.grad is not None]
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in shards:
            squares += torch.linalg.vector_norm(g, dtype=torch.float64) ** 2
        dist.all_reduce(squares)
        norm = squares.sqrt()
        if self.grad_clip_norm is not None and shards:
            coefficient = (self.grad_clip_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in shards:
                g.mul_(coefficient.to(g.dtype))
        return norm.detach()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (the tensor itself otherwise)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
