"""``<run dir>/diagnostic.jsonl``: every record plus the self-checks the console does not need."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from traintel.errors import ConfigError, one_line
from traintel.records import Record
from traintel.sinks._policy import droppable, urgent
from traintel.sinks.base import RunContext
from traintel.sinks.io.dirs import missing_dirs, remove_empty
from traintel.sinks.io.writer import BackgroundWriter, IncompleteWrite
from traintel.sinks.json.lines import LineRenderer

_TAIL_CHUNK = 64 * 1024
_RETRY_MIN = 64 * 1024
"""The least a file grows past a failed rotation before the next try."""
WRITE_RETRY = (0.1, 2.0)
"""Seconds before a failed write is tried again: the first delay, doubling up to the longest."""


def cut_torn_tail(path: Path) -> int:
    """Truncate ``path`` after its last newline; returns the bytes removed.

    A process killed mid-write (``kill -9``) can leave a torn last line; cutting it lets the next
    attempt append whole lines only. A file without any newline is emptied; a missing file is
    left missing (0 removed). The file is searched backwards, so a long file costs one chunk.
    """
    try:
        file = open(path, "r+b")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return 0
    with file:
        size = end = file.seek(0, os.SEEK_END)
        keep = 0
        while end > 0:
            start = max(0, end - _TAIL_CHUNK)
            file.seek(start)
            newline = file.read(end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        if keep < size:
            file.truncate(keep)
            os.fsync(file.fileno())
    return size - keep


class RotatingFile:
    """An append-only file that rolls over past ``max_bytes``: ``name`` -> ``name.1`` -> ... ``name.N``.

    Rotation happens only between whole writes, so a line is never split across files. ``size``
    is what ``path`` held when it was opened (an appended file counts towards ``max_bytes``).

    Lines are written with ``os.write`` on the file's descriptor: no buffer keeps part of a line.
    A write that fails part-way (a disk that fills up) is cut back to the end of its last whole
    line, so the file holds whole lines only, and raises ``IncompleteWrite`` saying how much of
    the data went out; the writer tries the rest again later.

    The next part is opened (as ``name.next``) before the current one is renamed or closed, so a
    process out of descriptors (EMFILE) or space keeps a file to write to: when that open fails
    the lines go on into the current part past ``max_bytes``, ``rotation_failures`` counts the
    failed attempts and ``rotation_error`` keeps the first. Rotation is tried again once another
    ``retry_bytes`` (``max_bytes // 16``, at least 64 KiB) are written, not on every line.
    """

    def __init__(self, path: Path, file: BinaryIO, max_bytes: int, backups: int, size: int = 0) -> None:
        self.path = path
        self.file = file
        self.max_bytes = max_bytes
        self.backups = backups
        self.size = size
        self.retry_bytes = max(max_bytes // 16, _RETRY_MIN)
        self.rotation_failures = 0
        self.rotation_error: OSError | None = None
        self.deleted = False
        """The file lost its name while open (its run directory removed): later lines are lost."""
        self._retry_at = 0
        """Rotate no earlier than at this size (set past a failed rotation)."""

    def write(self, data: bytes) -> int:
        """Append whole lines, rotating between two lines when the next would pass ``max_bytes``;
        ``IncompleteWrite`` when only part of ``data`` (whole lines) could be written."""
        if not self.max_bytes or self.size + len(data) <= max(self.max_bytes, self._retry_at):
            self._append(data)
            return len(data)
        written = 0
        try:
            for line in data.splitlines(keepends=True):
                if self.size and self.size + len(line) > self.max_bytes and self.size >= self._retry_at:
                    self._rotate()
                self._append(line)
                written += len(line)
        except IncompleteWrite as exc:
            raise IncompleteWrite(exc.error, written + exc.written) from None
        except OSError as exc:  # a rename of the rotation: the lines before it are written
            raise IncompleteWrite(exc, written) from None
        return len(data)

    def _append(self, data: bytes) -> None:
        """Write ``data`` at the end of the file; on an error, cut what went out back to its last
        whole line and raise ``IncompleteWrite`` with the length kept. Where the cut fails, the
        start of the line stays and ``written`` includes it: the rest follows it when tried again."""
        fd = self.file.fileno()
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                done += os.write(fd, view[done:])
        except OSError as exc:
            whole = data.rfind(b"\n", 0, done) + 1
            if whole < done:
                try:
                    end = os.lseek(fd, 0, os.SEEK_CUR) - (done - whole)
                    os.ftruncate(fd, end)
                    os.lseek(fd, end, os.SEEK_SET)
                except OSError:
                    whole = done
            self.size += whole
            raise IncompleteWrite(exc, whole) from None
        self.size += done

    def _rotate(self) -> None:
        """Open the next part, then shift the names oldest first and close the old part.

        Each rename is atomic and overwrites only the part that falls off the end, so a crash
        loses no complete part; ``name`` is missing only between its two renames (a resumed
        attempt creates it). When the next part cannot be opened, nothing changes (class doc).
        """
        self.file.flush()  # the part is whole before it takes its new name
        spare = self.path.with_name(f"{self.path.name}.next")
        try:
            spare.unlink(missing_ok=True)  # left by a crash before the renames
            new = open(spare, "xb", buffering=0)  # noqa: SIM115 - held open until close()
        except OSError as exc:
            self.rotation_failures += 1
            if self.rotation_error is None:
                self.rotation_error = exc
            self._retry_at = self.size + self.retry_bytes
            return
        try:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            if self.backups:
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            os.replace(spare, self.path)  # without backups this drops the old part
        except BaseException:
            new.close()
            raise
        old, self.file = self.file, new
        self.size = self._retry_at = 0
        old.close()

    def flush(self) -> None:
        """Flush, and note once whether the file was deleted under the run (``deleted``): lines
        written to a file without a name are lost, which nothing else would tell."""
        self.file.flush()
        if not self.deleted and os.fstat(self.file.fileno()).st_nlink == 0:
            self.deleted = True

    def close(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        finally:
            self.file.close()


class DiagnosticSink:
    """Write one JSON object per record, with the record's ``diagnostics`` merged in.

    For ``train.batch`` these are ``expected_loss_scale`` (n_b/N_t from the item counts),
    ``observed_loss_scale`` (loss/raw_loss from the tensors), ``scale_ok``, the
    accumulation position and process memory: the check that catches a logged loss
    that is not the one given to backward.

    On a run's first attempt (``context.attempt == 0``) the file is created exclusively (an
    existing one is never overwritten: ConfigError). A resumed attempt appends to the file its
    earlier attempts wrote (creating it when missing), after cutting a line torn by ``kill -9``
    (``cut_torn_tail``), and never removes it; rotated parts are kept as they are. Lines are
    rendered on the training thread and written by a background writer behind a bounded
    queue (a slow disk never blocks training; ``train.batch`` records beyond
    ``capacity`` waiting lines are dropped and counted in ``dropped``). Lines reach the
    file within a quarter second (``run.end`` at once); the file is fsynced on close. Past ``max_bytes`` the
    file rotates to ``diagnostic.jsonl.1`` ... ``.<backups>``; when the next part cannot be
    opened (no free descriptor) writing goes on in the current part and the first such failure
    is raised once from ``emit``, its records already queued (``RotatingFile``).

    A write error (a full disk) is raised from ``emit`` once each time writing starts to fail,
    after the records are queued (the fan-out reports the first as a ``sink.error`` and counts
    each); training goes on. The writer tries the lines again, the delay doubling from 0.1 s to
    2 s (``WRITE_RETRY``), and the file keeps whole lines only (``RotatingFile``). Meanwhile the
    records queue up under the usual bounds (``train.batch``, then ``train.step`` records are
    dropped and counted in ``dropped``, and the next line written says how many); the lines
    still queued when a write succeeds again are written then, late and in order. Those still
    waiting at ``close`` get one more try, and what that cannot write is counted in ``dropped``.

    The sink makes records durable (``durable``): ``sync`` waits until the lines given so far are
    written and fsyncs the file; a checkpoint waits for it (``FanOut.durable``), and while the file
    cannot be written it returns False at once.

    Each line is rendered here from the record (its event dict, then its diagnostics) by
    the strict JSON renderer, independently of the JSON sink.
    """

    name = "diagnostic"
    durable = True
    """``sync`` makes the records given so far durable (written and fsynced): checkpoints wait for it."""

    def __init__(
        self,
        filename: str = "diagnostic.jsonl",
        *,
        max_bytes: int = 256 * 1024 * 1024,
        backups: int = 3,
        capacity: int = 10_000,
        close_timeout: float = 10.0,
    ) -> None:
        self.filename = filename
        self.renderer = LineRenderer()
        self.max_bytes = max_bytes
        self.backups = backups
        self.capacity = capacity
        self.close_timeout = close_timeout
        self.path: Path | None = None
        self._file: RotatingFile | None = None
        self._writer: BackgroundWriter[Record] | None = None
        self._written = 0
        self._dropped = 0
        self._failures_reported = 0
        self._rotation_reported = False
        self._deleted_reported = False
        self._made_dirs: list[Path] = []
        self._created = False

    @property
    def dropped(self) -> int:
        """Records not written: dropped behind a slow or failing disk, or still failing at close."""
        return self._writer.dropped if self._writer is not None else self._dropped

    def _open_file(self, path: Path) -> BinaryIO:
        return open(path, "xb", buffering=0)

    def _append_file(self, path: Path) -> tuple[BinaryIO, bool]:
        """A resumed attempt's file: created when missing, else its torn tail cut and opened for
        appending; and whether it was created."""
        try:
            return self._open_file(path), True
        except FileExistsError:
            cut_torn_tail(path)
            return open(path, "ab", buffering=0), False

    def open(self, context: RunContext) -> None:
        path = context.run_dir / self.filename
        self._written = 0
        self._failures_reported = 0
        self._rotation_reported = False
        self._made_dirs = missing_dirs(context.run_dir)
        try:
            context.run_dir.mkdir(parents=True, exist_ok=True)
            if context.attempt > 0:
                file, self._created = self._append_file(path)
            else:
                file, self._created = self._open_file(path), True
        except FileExistsError:
            raise ConfigError(
                "run.dir", f"{str(path)!r} already exists and is never overwritten; choose another run.dir"
            ) from None
        except OSError as exc:
            raise ConfigError("run.dir", f"cannot create {str(path)!r}: {exc.strerror}") from None
        self.path = path
        self._file = RotatingFile(path, file, self.max_bytes, self.backups, size=file.seek(0, os.SEEK_END))
        self._writer = BackgroundWriter(
            self.name,
            self._file,
            droppable=droppable,
            urgent=urgent,
            capacity=self.capacity,
            close_timeout=self.close_timeout,
            retry=WRITE_RETRY,
        )

    def render(self, record: Record, dropped: int = 0) -> bytes:
        """The record's line: its fields, then its diagnostics, then ``dropped`` when records were lost."""
        line = self.renderer.event_dict(record)
        line.update(record.diagnostics)
        if dropped:
            line["dropped"] = dropped
        return self.renderer(None, record.level, line)

    def emit(self, record: Record) -> None:
        self.emit_many((record,))

    def emit_many(self, records: Sequence[Record]) -> None:
        """Render ``records`` in order and queue their lines together; then raise (the records
        already queued) once each time writing started to fail, and once when the file could not
        start a new part or lost its name, so the fan-out reports it."""
        writer = self._writer
        if writer is None:
            msg = "DiagnosticSink.emit called before open"
            raise RuntimeError(msg)
        self._written += writer.offer_many(records, self.render)
        error = writer.error  # set before ``failures`` grows
        if error is not None and writer.failures > self._failures_reported:
            self._failures_reported = writer.failures
            msg = f"cannot write {str(self.path)!r}: {one_line(error)}; retrying"
            raise OSError(msg)
        f = self._file
        if f is not None and f.rotation_error is not None and not self._rotation_reported:
            self._rotation_reported = True  # raised after queuing: no record is lost for it
            msg = (
                f"cannot start a new part of {str(self.path)!r} ({one_line(f.rotation_error)}); "
                "writing on in the current part"
            )
            raise OSError(msg)
        if f is not None and f.deleted and not self._deleted_reported:
            self._deleted_reported = True
            msg = f"{str(self.path)!r} was deleted while the run wrote it; the records written since are lost"
            raise OSError(msg)

    def sync(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until the lines given so far are written, then fsync the
        file; False when they are not, at once while writing fails (see ``FanOut.durable``)."""
        writer, f = self._writer, self._file
        if writer is None or f is None:
            return True
        if not writer.drain(timeout) or writer.failed is not None:  # drain returns at once while failing
            return False
        os.fsync(f.file.fileno())
        return True

    def close(self) -> None:
        """Drain the writer, fsync and close; a file this attempt created that never received a
        record is removed with the directories ``open`` created, so a run that never started leaves
        nothing behind (an earlier attempt's file is kept)."""
        writer, self._writer = self._writer, None
        f, self._file = self._file, None
        if writer is None or f is None:
            return
        drained = writer.close()
        self._dropped = writer.dropped
        if not drained:
            return  # the disk is stuck; the daemon writer still owns the file
        with contextlib.suppress(OSError):  # a full disk was already reported from emit
            f.close()
        if self._written == 0 and self._created and self.path is not None:
            self.path.unlink(missing_ok=True)
            remove_empty(self._made_dirs)
