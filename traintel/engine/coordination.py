"""What the ranks of a run agree on: a window's items, when to stop, when to deliver records.

A single process agrees with itself (``Coordinator``). Under torch.distributed,
``ProcessGroupCoordinator`` makes that agreement one ``all_reduce`` per optimizer step, before
the window's first backward, and is the only collective of a step besides the gradient
reduction (``trainer.on_nonfinite=skip_step`` adds one: whether every rank's loss is finite);
the telemetry's sums (step and epoch losses, evaluation) take one more per delivery of records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

PEER_STOP_REASON = "stopped with another rank"
"""``run.end``'s reason on a rank that ended because another rank was asked to stop (a signal)."""


class Agreement(NamedTuple):
    """The outcome of one step's agreement, the same on every rank."""

    items: int
    """N: the window's items over all ranks."""
    stop: bool
    """Some rank was asked to stop (a signal): every rank ends after this step."""
    deliver: bool
    """Rank 0's delivery delay has passed: every rank delivers its waiting records after this step."""


class Coordinator:
    """One process: every agreement is this process's own counts and requests."""

    rank = 0
    world_size = 1

    def __init__(self) -> None:
        self.stop_requested = False
        """Set by a signal handler; the next agreement makes it every rank's decision."""
        self.deliver_requested = False
        """Set by rank 0's telemetry when its delivery delay has passed."""
        self.last = Agreement(0, False, False)
        """The latest agreement (the current or last optimizer step's)."""

    @property
    def distributed(self) -> bool:
        return False

    @property
    def stopping(self) -> bool:
        """Whether a stop ends the run at the next boundary: the ranks agreed on one in the last
        step, or, in a run of one process, one was asked for since (a signal during the step, or
        during an epoch's end)."""
        return self.last.stop or (self.stop_requested and not self.distributed)

    def agree(self, items: int) -> Agreement:
        """This window's items over all ranks, and whether to stop or deliver after this step."""
        self.last = Agreement(items, self.stop_requested, self.deliver_requested)
        self.deliver_requested = False
        return self.last

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the ranks, in float64."""
        return list(values)

    def all_true(self, local: bool) -> bool:
        """Whether ``local`` holds on every rank (every rank's window loss is finite under
        ``trainer.on_nonfinite=skip_step``; every rank wrote its checkpoint); here, ``local``."""
        return local

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order; here, ``[value]``."""
        return [value]


_FLAG = 1 << 12
"""A flag's field in the packed agreement: its sum over fewer than 4096 ranks fits."""
_ITEM = _FLAG * _FLAG
"""The items' place in the packed agreement, above the two flags."""
_ITEMS_LIMIT = 1 << 39
"""Items a window may hold over all ranks in the packed agreement (2**39 * 2**24 < 2**63)."""


class ProcessGroupCoordinator(Coordinator):
    """The ranks of the default process group: each agreement is one integer ``all_reduce`` (SUM)."""

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        super().__init__()
        self._dist = dist
        self.device = device
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    @property
    def distributed(self) -> bool:
        return True

    def agree(self, items: int) -> Agreement:
        """One ``all_reduce`` (SUM) of a single int64 that packs the items and the two flags.

        gloo takes about 1.6x as long for three elements as for one, which was a third of a
        two-rank step on a small model (``benchmarks/distributed.py``). Packed, each flag has 12
        bits (fewer than 4096 ranks; a larger job reduces three elements) and the items the 39
        above them (a window of fewer than 2**39 items over all ranks).
        """
        stop = int(self.stop_requested)
        deliver = int(self.deliver_requested and self.rank == 0)
        self.deliver_requested = False
        if self.world_size >= _FLAG:
            counts = torch.tensor([items, stop, deliver], dtype=torch.int64, device=self.device)
            self._dist.all_reduce(counts)
            total, stops, delivers = counts.tolist()
            self.last = Agreement(int(total), stops > 0, delivers > 0)
            return self.last
        if items * self.world_size >= _ITEMS_LIMIT:
            msg = f"a window of {items} items on one rank is more than the ranks can agree on (2**39 in all)"
            raise ValueError(msg)
        packed = torch.tensor([items * _ITEM + stop * _FLAG + deliver], dtype=torch.int64, device=self.device)
        self._dist.all_reduce(packed)
        total, flags = divmod(int(packed.item()), _ITEM)
        stops, delivers = divmod(flags, _FLAG)
        self.last = Agreement(total, stops > 0, delivers > 0)
        return self.last

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        if not values:
            return []
        sums = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        self._dist.all_reduce(sums)
        out: list[float] = sums.tolist()
        return out

    def gather(self, value: Any) -> list[Any]:
        """``all_gather_object``: every rank's ``value`` in rank order (setup and checkpoints only)."""
        values: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(values, value)
        return values

    def all_true(self, local: bool) -> bool:
        """One ``all_reduce`` (MIN) of a one-element int flag: true only when it is true on every rank."""
        flag = torch.tensor([int(local)], dtype=torch.int64, device=self.device)
        self._dist.all_reduce(flag, op=self._dist.ReduceOp.MIN)
        return bool(flag.item())
