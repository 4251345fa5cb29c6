"""Group a loader's micro-batches into per-epoch accumulation windows."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any, NamedTuple

from traintel.engine import rng


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

    Resumable: ``state_dict()`` holds what the current pass drew from when it started (the
    loader's generators and torch's, see ``traintel.engine.rng.capture_loader``) and how many
    windows it has yielded. After ``load_state_dict``, the next pass puts those generators
    back, so the loader draws the same order and worker seeds, reads and discards the windows
    already trained on, and only then calls ``after`` (which restores the generators as they
    were at the checkpoint) and goes on from the next window.
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
        self.yielded = 0
        """Windows yielded by the current pass."""
        self._pass_start: dict[str, Any] | None = None
        self._resume: tuple[Mapping[str, Any], Callable[[], None]] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The current pass's starting generator states and the windows it has yielded."""
        if self._pass_start is None:
            msg = "no pass over the loader has started"
            raise RuntimeError(msg)
        return {"pass_start": self._pass_start, "yielded": self.yielded}

    def load_state_dict(self, state: Mapping[str, Any], after: Callable[[], None]) -> None:
        """Make the next pass continue the one ``state`` describes (see the class docstring)."""
        yielded = state["yielded"]
        if type(yielded) is not int or yielded < 0:
            msg = f"loader 'yielded' must be an integer >= 0, got {yielded!r}"
            raise ValueError(msg)
        self._resume = (state, after)

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
        resume, self._resume = self._resume, None
        if resume is not None:
            rng.restore_loader(self.loader, resume[0]["pass_start"])
        self._pass_start = rng.capture_loader(self.loader)
        self.yielded = 0
        windows = self._windows()
        if resume is not None:
            state, after = resume
            for _ in range(state["yielded"]):  # read again, not trained on again
                if next(windows, None) is None:
                    break
                self.yielded += 1
            after()
        for window in windows:
            self.yielded += 1
            yield window

    def _windows(self) -> Iterator[Window]:
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
