"""One rank of a torch.distributed run: the update step over a ``DistributedDataParallel`` model.

Every rank scales its micro-batches by the window's items over all ranks (N, from the
coordinator's one ``all_reduce``), so the sum over ranks of their gradients is the gradient of
the item-weighted mean loss over the union of their micro-batches. DDP would average the
ranks' gradients (divide their sum by the world size); ``sum_hook`` makes its reduction a plain
sum instead, so the value given to ``backward()`` on each rank is exactly the logged share and no
factor is folded anywhere. Micro-batches before the last of a window run inside ``no_sync()``:
one gradient reduction per optimizer step.
"""

# No ``from __future__ import annotations`` here: DDP compares the hook's annotations with the
# classes themselves (``dist.GradBucket``, ``Future[Tensor]``), so they must be evaluated.
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import GradBucket
from torch.nn.parallel import DistributedDataParallel

from traintel.engine.step import AccumulatingStep


def sum_hook(_state: object, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook: all-reduce the bucket's gradients as a SUM (DDP's default averages)."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    assert work is not None  # async_op=True returns the work handle
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """``model`` in DDP with the summing hook; parameters are broadcast from rank 0."""
    ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=ids, output_device=device.index if ids else None)
    ddp.register_comm_hook(None, sum_hook)
    return ddp


class DistributedStep(AccumulatingStep):
    """``AccumulatingStep`` on one rank: ``model`` is a ``DistributedDataParallel`` module.

    ``run_micro_batch`` puts off the gradient reduction (``no_sync``) for every micro-batch but the
    window's last that runs backward. A rank whose window holds no items while the others' do
    (a shorter shard, masked items) still takes part in the reduction once, with a forward and
    backward of zero weight on a batch it has already seen.
    """

    example: Any = None
    """A batch with items to take part with: the first this rank ran, or one given before the run
    to a rank whose share is empty."""

    def run_micro_batch(
        self, batch: Any, items: int, window_items: int, last: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if items and self.example is None:
            self.example = batch
        if last:
            return super().run_micro_batch(batch, items, window_items, last)
        ddp: DistributedDataParallel = self.model  # type: ignore[assignment]
        with ddp.no_sync():
            return super().run_micro_batch(batch, items, window_items, last)

    def take_part(self) -> None:
        self.zero_pass()

    def zero_pass(self) -> None:
        """A forward and backward of zero weight on ``example``: this rank joins the collectives of a
        pass without adding to the gradient. What the training metrics keep of it is let go of."""
        if self.example is None:
            msg = "this rank has no training items to take part in a gradient reduction with"
            raise RuntimeError(msg)
        kept = self._outputs
        before = len(kept) if kept is not None else 0
        self.backward(self.micro_batch_loss(self.example) * 0.0)
        if kept is not None:
            del kept[before:]
