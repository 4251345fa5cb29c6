"""A background writer behind a queue bounded in bytes, so a slow consumer never blocks training.

A sink hands items (records) to ``offer_many`` with its render function: lines are rendered on
the training thread (rendering on another thread would make training wait for the GIL) and
joined into one exact-size ``bytes`` object per call, and a daemon thread writes queued lines in
batches, holding the GIL only to take them from the queue. The writer is woken rarely, because
every wake-up makes the training thread hand over the GIL: at once for an item the sink's
``urgent`` policy names and for routed log lines, otherwise when ``linger`` seconds have passed
since the last wake-up or when half the line bound (at most 1024 lines) is waiting.

Memory is bounded: ``max_bytes`` bounds everything waiting in the writer (lines, their objects
and the batch being written), and ``capacity`` bounds the lines waiting before the first drops.
The sink's ``droppable`` policy ranks each item (``_policy``): ``DROP_FIRST`` items are dropped
when ``capacity`` lines or half of ``max_bytes`` are waiting, ``DROP_LAST`` items when
``max_bytes`` are waiting, ``KEEP`` items never (the sink keeps them few). A dropped item is not
rendered; it is counted in ``dropped`` and the count goes on the next line rendered. Lines
queued with ``submit`` (routed log lines, captured ``print`` text) follow the same rule with the
rank they are given. The writer knows nothing of records: the sink gives it both policies.
``close`` drains the queue within ``close_timeout`` seconds.

A write error ends writing for good, unless the sink asks for ``retry`` (the diagnostic file: a
full disk is often transient). Then the batch that failed is kept, from its first line not
written (a stream whose write is cut short says how much of it went out: ``IncompleteWrite``),
and tried again after a back-off that doubles from ``retry[0]`` to at most ``retry[1]`` seconds;
meanwhile lines queue up under the usual bounds and drop policy, and once a write succeeds the
waiting lines are written late, in order. ``failed`` holds the error while writing fails and
``drain`` returns False at once then. At ``close`` each batch still waiting gets one more try;
what that cannot write is lost and counted in ``dropped``.

What a queued line costs: orjson returns a line in a buffer of several KiB whatever its
length (a 300-byte line held about 8 KiB), so a queue of rendered lines pinned 25 times their
size. Each call's lines are copied into one exact-size object (``b"".join``, ``bytes(memoryview)``
for one line), which costs its length plus ``CHUNK_OVERHEAD`` (object header, allocator and
queue slot); that is what ``max_bytes`` counts.

Counters are never shared between threads: the thread that delivers records (one at a time)
owns the ``offer_many`` counters, ``submit`` (any thread) takes a lock of its own, and the
writer thread owns what it has written; so the training thread takes no lock and makes no
system call per record.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import select
import stat
import struct
import termios
import threading
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO, Generic, Protocol, TypeVar

from traintel import threads
from traintel.sinks._policy import DROP_FIRST, KEEP

_MAX_WAKE_LINES = 1024  # lines waiting that wake the writer before its linger
_MAX_BATCH_BYTES = 256 * 1024  # bytes the writer joins into one write
_LINE_ESTIMATE = 4096  # bytes a line is taken to hold when deciding that no item can be dropped
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
"""The default byte bound of a writer's queue (per writer: stdout's and the diagnostic file's)."""
CHUNK_OVERHEAD = 96
"""What a queued bytes object costs beyond its length: its header (33 bytes), the allocator's
rounding and header, the queue's slot and the tuple that holds it with its line count."""
PIPE_BUF = getattr(select, "PIPE_BUF", 4096)
"""Writes of at most this many bytes to a pipe are atomic (POSIX)."""
_ROOM_POLL = 0.005  # seconds between looks at a pipe before writing a line longer than PIPE_BUF
_ROOM_WAIT = 1.0  # how long a pipe that is read but never empty holds back a long line

T = TypeVar("T")


class IncompleteWrite(Exception):
    """Raised by a stream whose write failed part-way: the first ``written`` bytes of the data
    (whole lines) went out, the rest did not because of ``error``."""

    def __init__(self, error: OSError, written: int) -> None:
        super().__init__(error, written)
        self.error = error
        self.written = written


def never(_item: object) -> bool:
    """The default policy: no item is droppable (False is ``KEEP``), none is urgent."""
    return False


class Stream(Protocol):
    """What the writer writes to: a binary file, a pipe, a rotating file. ``write`` writes all of
    the data or raises; ``IncompleteWrite`` when part of it (whole lines) went out."""

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


class FdStream:
    """Write to a file descriptor with ``os.write`` (no Python-level buffer or lock to get stuck on),
    whole lines at a time on a pipe or socket.

    On a pipe or a socket, data is written in pieces of whole lines of at most ``PIPE_BUF`` bytes:
    each piece is one atomic ``write``, so another process writing to the same pipe never lands
    inside a line, and a process that exits while its writer waits on a stalled reader leaves
    only whole lines behind. A line longer than ``PIPE_BUF`` is written alone, and on a pipe only
    once the pipe is empty (looked at every 5 ms), so it does not block half written either,
    unless it is longer than the pipe or other processes keep a reading pipe from emptying for
    a second (``_wait_for_empty_pipe``). Files and terminals get one ``write`` per batch.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            mode = 0
        self.pipe = stat.S_ISFIFO(mode)
        self.whole_lines = self.pipe or stat.S_ISSOCK(mode)
        """Write whole lines of at most PIPE_BUF bytes per ``write``."""

    def write(self, data: bytes) -> int:
        if not self.whole_lines or len(data) <= PIPE_BUF:
            self._write_all(data)
            return len(data)
        view, start, size = memoryview(data), 0, len(data)
        while start < size:
            stop = start + PIPE_BUF
            if stop >= size:
                stop = size
            else:
                cut = data.rfind(b"\n", start, stop)
                if cut >= 0:
                    stop = cut + 1
                else:  # a line longer than PIPE_BUF: alone, once the pipe has room for it
                    cut = data.find(b"\n", stop)
                    stop = size if cut < 0 else cut + 1
                    self._wait_for_empty_pipe()
            self._write_all(view[start:stop])
            start = stop
        return size

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def _wait_for_empty_pipe(self) -> None:
        """Before a line longer than PIPE_BUF: wait until the pipe is empty, when every page of it
        is free (how much is unread tells nothing of the free pages). A stalled reader is waited
        for as long as it takes; a reader that reads while other processes keep the pipe from
        emptying, at most ``_ROOM_WAIT`` seconds: then the line is written anyway, and its write
        completes as the reader reads on."""
        if not self.pipe:
            return
        reading_since: float | None = None
        last = None
        with contextlib.suppress(OSError):
            while unread := struct.unpack("i", fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0"))[0]:
                now = time.monotonic()
                if last is not None and unread < last and reading_since is None:
                    reading_since = now
                if reading_since is not None and now - reading_since >= _ROOM_WAIT:
                    return
                last = unread
                time.sleep(_ROOM_POLL)

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
        droppable: Callable[[T], int] = never,
        urgent: Callable[[T], bool] = never,
        capacity: int = 10_000,
        max_bytes: int = DEFAULT_MAX_BYTES,
        close_timeout: float = 5.0,
        linger: float = 0.25,
        threaded: bool = True,
        retry: tuple[float, float] | None = None,
    ) -> None:
        self.name = name
        self.stream = stream
        self.capacity = capacity
        """Lines waiting before ``DROP_FIRST`` items are dropped."""
        self.max_bytes = max_bytes
        """Bytes waiting (as ``CHUNK_OVERHEAD`` and the lines' lengths count them) before
        ``DROP_LAST`` items are dropped; half of it before ``DROP_FIRST`` items are."""
        self.close_timeout = close_timeout
        self.threaded = threaded
        """False: write each line at once on the caller's thread (a terminal, where lines must
        interleave in order with a progress bar, and blocking on a person's screen is fine)."""
        self.droppable = droppable
        """How readily an item may be dropped (``_policy``: KEEP, DROP_LAST, DROP_FIRST; a bool
        works: True is DROP_LAST)."""
        self.urgent = urgent
        """Whether an item's line wakes the writer at once."""
        self.retry = retry
        """(first, longest) seconds between tries of a write that failed with an ``OSError``; None:
        a write error ends writing, and the lines given later are counted as dropped."""
        self.failed: BaseException | None = None
        """The write error while writing fails: with ``retry``, None again once a write succeeds."""
        self.failures = 0
        """How many times writing has started to fail (a write error after a successful write)."""
        self.error: BaseException | None = None
        """The latest write error, kept after writing succeeds again."""
        self._queue: collections.deque[tuple[bytes, int]] = collections.deque()
        """(lines, how many) per call; appended by producers, popped from the left by the writer."""
        # the delivering thread's (offer_many)
        self._queued_lines = 0
        self._queued_bytes = 0
        self._offer_dropped = 0
        self._unreported = 0
        self._side_reported = 0
        # any thread's, under _side_lock (submit)
        self._side_lock = threading.Lock()
        self._side_lines = 0
        self._side_bytes = 0
        self._side_dropped = 0
        # the writer thread's
        self._done_lines = 0
        self._done_bytes = 0
        self._lost = 0
        self._abandoned = 0
        """Lines still waiting when ``close`` gave up on a stalled stream."""
        self._cond = threading.Condition()
        self._closing = False
        self.linger = linger
        self._woken = 0.0  # the first line wakes the writer at once
        self._wake_at = max(1, min(_MAX_WAKE_LINES, capacity // 2))
        self._thread = threading.Thread(target=self._loop, name=f"traintel-{name}-writer", daemon=True)
        if threaded:
            threads.start(self._thread)

    @property
    def dropped(self) -> int:
        """Items dropped so far because the consumer fell behind (or could not be written to),
        lines lost to a write error, and lines given up at a close that timed out."""
        return self._offer_dropped + self._side_dropped + self._lost + self._abandoned

    @property
    def waiting_bytes(self) -> int:
        """Bytes queued and not yet written, as ``max_bytes`` counts them."""
        return self._queued_bytes + self._side_bytes - self._done_bytes

    @property
    def waiting_lines(self) -> int:
        """Lines queued and not yet written."""
        return self._queued_lines + self._side_lines - self._done_lines

    def _full_for(self, rank: int, waiting_bytes: int, waiting_lines: int) -> bool:
        """Whether an item of drop rank ``rank`` is dropped with this much waiting."""
        if rank >= DROP_FIRST:
            return waiting_lines >= self.capacity or 2 * waiting_bytes >= self.max_bytes
        return bool(rank) and waiting_bytes >= self.max_bytes

    def offer_many(self, items: Sequence[T], render: Callable[[T, int], bytes]) -> int:
        """Render and queue ``items`` in order under the drop policy, with one wake-up decision
        for all of them; returns how many were queued. ``render(item, dropped)`` makes an item's
        line, given how many items were dropped since the last line (0 when none). Called by one
        thread at a time (the one delivering records)."""
        waiting_bytes = self._queued_bytes + self._side_bytes - self._done_bytes
        room_last = self.max_bytes - waiting_bytes
        room_first = room_last - self.max_bytes // 2
        room_lines = self.capacity - (self._queued_lines + self._side_lines - self._done_lines)
        side = self._side_dropped - self._side_reported  # dropped log lines: reported on a record line
        if side:
            self._side_reported += side
            self._unreported += side
        if len(items) <= room_lines and len(items) * _LINE_ESTIMATE <= room_first:
            # far from both bounds (the usual case): no drop decision per item
            dropped, self._unreported = self._unreported, 0
            lines = [render(item, dropped if i == 0 else 0) for i, item in enumerate(items)]
            if lines:
                self._put(lines, urgent=any(self.urgent(item) for item in items))
            return len(lines)
        lines = []
        size = 0
        for item in items:
            if size >= room_first or len(lines) >= room_lines:
                rank = self.droppable(item)
                if rank >= DROP_FIRST or (rank and size >= room_last):
                    self._offer_dropped += 1
                    self._unreported += 1
                    continue
            dropped, self._unreported = self._unreported, 0
            line = render(item, dropped)
            lines.append(line)
            size += len(line)
        if lines:
            self._put(lines, urgent=any(self.urgent(item) for item in items))
        return len(lines)

    def _put(self, lines: list[bytes], *, urgent: bool) -> None:
        if self._closing:
            msg = f"{self.name}: line submitted after close"
            raise RuntimeError(msg)
        chunk = b"".join(lines) if len(lines) > 1 else bytes(memoryview(lines[0]))  # exact size
        if not self.threaded:
            self._write([(chunk, len(lines))])
            return
        self._queue.append((chunk, len(lines)))  # deque.append is atomic; the writer pops from the left
        self._queued_lines += len(lines)
        self._queued_bytes += len(chunk) + CHUNK_OVERHEAD
        self._wake(urgent)

    def _wake(self, urgent: bool) -> None:
        now = time.monotonic()
        if urgent or now - self._woken >= self.linger or self.waiting_lines >= self._wake_at:
            self._woken = now
            with self._cond:
                self._cond.notify()

    def submit(self, line: bytes, *, urgent: bool = False, rank: int = KEEP) -> bool:
        """Queue one line (see ``submit_many``)."""
        return self.submit_many([line], urgent=urgent, rank=rank)

    def submit_many(self, lines: list[bytes], *, urgent: bool = False, rank: int = KEEP) -> bool:
        """Queue already rendered lines from any thread (routed log lines, captured text) unless
        their drop ``rank`` says the queue is too full for them (then they are counted in
        ``dropped``, and the count goes on the next record's line); returns whether they were
        queued. The writer is woken for ``urgent`` ones, when ``linger`` seconds have passed
        since the last wake-up, or when enough lines are waiting (module docstring)."""
        if self._closing:
            msg = f"{self.name}: line submitted after close"
            raise RuntimeError(msg)
        if not lines:
            return True
        chunk = b"".join(lines) if len(lines) > 1 else bytes(memoryview(lines[0]))  # exact size
        if not self.threaded:
            self._write([(chunk, len(lines))])
            return True
        with self._side_lock:
            if rank and self._full_for(rank, self.waiting_bytes, self.waiting_lines):
                self._side_dropped += len(lines)
                return False
            self._queue.append((chunk, len(lines)))
            self._side_lines += len(lines)
            self._side_bytes += len(chunk) + CHUNK_OVERHEAD
        self._wake(urgent)
        return True

    def _take(self) -> list[tuple[bytes, int]] | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait(self.linger)
            if not self._queue:
                return None
            batch = [self._queue.popleft()]
            size = len(batch[0][0])
            while self._queue and size < _MAX_BATCH_BYTES:
                batch.append(self._queue.popleft())
                size += len(batch[-1][0])
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self._write(batch)
            with self._cond:
                self._done_lines += sum(n for _, n in batch)
                self._done_bytes += sum(len(chunk) for chunk, _ in batch) + CHUNK_OVERHEAD * len(batch)
                self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until every line queued so far is written (or lost to a write error); False if that
        takes longer than ``timeout`` seconds, and at once while a write fails and is to be tried
        again (``failed`` with ``retry``). Called by the training thread, never by the writer."""
        if not self.threaded:
            return True
        target = self._queued_bytes + self._side_bytes
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()  # wake the writer now instead of after its linger
            while self._done_bytes < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive() or self._retrying():
                    return self._done_bytes >= target
                self._cond.wait(left)
        return True

    def _retrying(self) -> bool:
        return self.retry is not None and self.failed is not None

    def _write(self, batch: list[tuple[bytes, int]]) -> None:
        """Write a batch; on an error, count its lines as lost, or with ``retry`` try again after
        the back-off until a write succeeds or the writer closes (then one more try)."""
        if self.failed is not None and self.retry is None:
            self._lost += sum(n for _, n in batch)
            return
        data = batch[0][0] if len(batch) == 1 else b"".join(chunk for chunk, _ in batch)
        delay = self.retry[0] if self.retry is not None else 0.0
        while True:
            closing = self._closing
            try:
                if data:
                    self.stream.write(data)
                    data = b""
                self.stream.flush()
            except IncompleteWrite as exc:
                data = data[exc.written :]
                error: BaseException = exc.error
            except Exception as exc:  # a full disk, a closed pipe
                error = exc
            else:
                if self.failed is not None:
                    with self._cond:
                        self.failed = None
                return
            self.error = error
            if self.failed is None:
                self.failures += 1
            with self._cond:
                self.failed = error
                self._cond.notify_all()  # a drain waiting for these lines returns now
            if self.retry is None or closing or not isinstance(error, OSError):
                self._lost += data.count(b"\n") if self.retry is not None else sum(n for _, n in batch)
                return
            self._back_off(delay)
            delay = min(2 * delay, self.retry[1])

    def _back_off(self, seconds: float) -> None:
        """Wait ``seconds`` before the next try, or less when the writer is being closed."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while not self._closing and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)

    def close(self) -> bool:
        """Stop accepting lines and drain the queue; False if it could not finish in time, and then
        the lines not yet written are given up and counted in ``dropped`` (the stalled write may
        still finish some of them after the run)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if not self.threaded:
            return True
        self._thread.join(self.close_timeout)
        if not self._thread.is_alive():
            return True
        with self._cond:
            self._abandoned = self.waiting_lines
        return False
