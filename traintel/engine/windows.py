"""Group a loader's micro-batches into per-epoch accumulation windows."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sized
from typing import Any, NamedTuple


class Window(NamedTuple):
    """The micro-batches of one optimizer step (immutable; a NamedTuple is the cheapest to build)."""

    batches: tuple[Any, ...]
    first_batch: int
    """1-based index in the epoch of the first micro-batch."""
    batches_per_epoch: int | None
    """Loader length when known."""


class WindowedLoader:
    """Yield windows of ``k`` micro-batches; one pass over the loader is one epoch.

    Windows never cross an epoch: the last window holds the B mod k leftover
    micro-batches (when non-zero) and is yielded, never dropped or carried over.
    ``len()`` is ceil(B/k) when the loader has a length, which is what Ignite uses as
    the epoch length.
    """

    def __init__(self, loader: Iterable[Any], k: int, *, windows: int | None = None) -> None:
        if k < 1:
            msg = f"accumulation steps must be >= 1, got {k}"
            raise ValueError(msg)
        self.loader = loader
        self.k = k
        self.windows = windows
        """Windows per epoch, when every rank must take part in the same number of optimizer
        steps: after its own data this loader yields empty windows up to that count."""

    def batches_per_epoch(self) -> int | None:
        if isinstance(self.loader, Sized):
            try:
                return len(self.loader)
            except TypeError:
                return None
        return None

    def __len__(self) -> int:
        if self.windows is not None:
            return self.windows
        b = self.batches_per_epoch()
        if b is None:
            msg = "the training loader has no length"
            raise TypeError(msg)
        return math.ceil(b / self.k)

    def __iter__(self) -> Iterator[Window]:
        total = self.batches_per_epoch()
        pending: list[Any] = []
        first = 1
        count = 0
        for index, batch in enumerate(self.loader, start=1):
            pending.append(batch)
            if len(pending) == self.k:
                yield Window(tuple(pending), first, total)
                count += 1
                pending = []
                first = index + 1
        if pending:
            yield Window(tuple(pending), first, total)
            count += 1
        for _ in range(count, self.windows or 0):  # this rank is out of data; the others are not
            yield Window((), (total or 0) + 1, total)
