"""A background writer behind a bounded queue, so a slow consumer never blocks training.

A sink hands items (records) to ``offer_many`` with its render function: lines are
rendered on the training thread (rendering on another thread would make training wait for
the GIL) and a daemon thread writes queued lines in batches, holding the GIL only to take
them from the queue. The writer is woken rarely, because every wake-up makes the training
thread hand over the GIL: at once for an item the sink's ``urgent`` policy names and for
routed log lines, otherwise when ``linger`` seconds have passed since the last wake-up or
when half the queue (at most 1024 lines) is waiting. When ``capacity`` lines are waiting,
items the sink's ``droppable`` policy names are dropped instead of rendered and counted,
and the count is put on the next line rendered; every other item is still queued. The
writer knows nothing of records: the sink gives it both policies. ``close`` drains the
queue within ``close_timeout`` seconds.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO, Generic, Protocol, TypeVar

_MAX_BATCH = 1024  # lines joined into one write

T = TypeVar("T")


def never(_item: object) -> bool:
    """The default policy: no item is droppable, none is urgent."""
    return False


class Stream(Protocol):
    """What the writer writes to: a binary file, a pipe, a rotating file."""

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


class FdStream:
    """Write to a file descriptor with ``os.write`` (no Python-level buffer or lock to get stuck on)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        os.close(self.fd)


class BackgroundWriter(Generic[T]):
    """Write queued lines on a daemon thread; see the module docstring for the policy."""

    def __init__(
        self,
        name: str,
        stream: Stream | BinaryIO,
        *,
        droppable: Callable[[T], bool] = never,
        urgent: Callable[[T], bool] = never,
        capacity: int = 10_000,
        close_timeout: float = 5.0,
        linger: float = 0.25,
        threaded: bool = True,
    ) -> None:
        self.name = name
        self.stream = stream
        self.capacity = capacity
        self.close_timeout = close_timeout
        self.threaded = threaded
        """False: write each line at once on the caller's thread (a terminal, where lines must
        interleave in order with a progress bar, and blocking on a person's screen is fine)."""
        self.droppable = droppable
        """Whether an item may be dropped (and counted) when ``capacity`` lines are waiting."""
        self.urgent = urgent
        """Whether an item's line wakes the writer at once."""
        self.dropped = 0
        """Records dropped so far because the consumer fell behind (or the stream failed)."""
        self.failed: BaseException | None = None
        """The first write error; lines queued after it are counted as dropped."""
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        """Lines queued so far (by the training thread)."""
        self._done = 0
        """Lines written (or counted as lost) so far (by the writer thread)."""
        self._unreported = 0
        self._cond = threading.Condition()
        self._closing = False
        self.linger = linger
        self._woken = 0.0  # the first line wakes the writer at once
        self._wake_at = max(1, min(_MAX_BATCH, capacity // 2))
        self._thread = threading.Thread(target=self._loop, name=f"traintel-{name}-writer", daemon=True)
        if threaded:
            self._thread.start()

    def offer_many(self, items: Sequence[T], render: Callable[[T, int], bytes]) -> int:
        """Render and queue ``items`` in order under the drop policy, with one wake-up decision
        for all of them; returns how many were queued. ``render(item, dropped)`` makes an item's
        line, given how many items were dropped since the last line (0 when none)."""
        room = self.capacity - len(self._queue)
        lines: list[bytes] = []
        for item in items:
            if room <= len(lines) and self.droppable(item):
                self.dropped += 1
                self._unreported += 1
                continue
            dropped, self._unreported = self._unreported, 0
            lines.append(render(item, dropped))
        if lines:
            self.submit_many(lines, urgent=any(self.urgent(item) for item in items))
        return len(lines)

    def submit(self, line: bytes, *, urgent: bool = False) -> None:
        """Queue one line (see ``submit_many``)."""
        self.submit_many([line], urgent=urgent)

    def submit_many(self, lines: list[bytes], *, urgent: bool = False) -> None:
        """Queue lines; the writer is woken for ``urgent`` ones, when ``linger`` seconds have
        passed since the last wake-up, or when enough lines are waiting (module docstring)."""
        if self._closing:
            msg = f"{self.name}: line submitted after close"
            raise RuntimeError(msg)
        if not self.threaded:
            self._write(lines)
            return
        self._queue.extend(lines)  # deque.extend is atomic; the writer only pops from the left
        self._queued += len(lines)
        now = time.monotonic()
        if urgent or len(self._queue) >= self._wake_at or now - self._woken >= self.linger:
            self._woken = now
            with self._cond:
                self._cond.notify()

    def _take(self) -> list[bytes] | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait(self.linger)
            if not self._queue:
                return None
            return [self._queue.popleft() for _ in range(min(_MAX_BATCH, len(self._queue)))]

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self._write(batch)
            with self._cond:
                self._done += len(batch)
                self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until every line queued so far is written (or lost to a write error); False if that
        takes longer than ``timeout`` seconds. Called by the training thread, never by the writer."""
        if not self.threaded:
            return True
        target = self._queued
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()  # wake the writer now instead of after its linger
            while self._done < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return self._done >= target
                self._cond.wait(left)
        return True

    def _write(self, batch: list[bytes]) -> None:
        if self.failed is not None:
            self.dropped += len(batch)
            return
        try:
            self.stream.write(b"".join(batch))
            self.stream.flush()
        except Exception as exc:  # a full disk, a closed pipe: count, keep draining
            self.failed = exc
            self.dropped += len(batch)

    def close(self) -> bool:
        """Stop accepting lines and drain the queue; False if it could not finish in time."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if not self.threaded:
            return True
        self._thread.join(self.close_timeout)
        return not self._thread.is_alive()
