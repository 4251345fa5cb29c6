"""``<run dir>/diagnostic.jsonl``: every record plus the self-checks the console does not need."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO

from traintel.errors import ConfigError
from traintel.records import EpochRecord, EvalRecord, Record, RunEndRecord
from traintel.sinks._jsonline import dumps, iso_utc, strict_fields
from traintel.sinks.base import RunContext

_FLUSH_ON = (EpochRecord, EvalRecord, RunEndRecord)


class DiagnosticSink:
    """Write one JSON object per record, with the record's ``diagnostics`` merged in.

    For ``train.batch`` these are ``expected_loss_scale`` (n_b/N_t from the item counts),
    ``observed_loss_scale`` (loss/raw_loss from the tensors), ``scale_ok``, the
    accumulation position and process memory: the check that catches a logged loss
    that is not the one given to backward. The file is created exclusively (an existing
    one is never overwritten), flushed at every epoch and at run end, and fsynced on close.
    """

    name = "diagnostic"

    def __init__(self, filename: str = "diagnostic.jsonl") -> None:
        self.filename = filename
        self.path: Path | None = None
        self._file: BinaryIO | None = None
        self._written = 0
        self._made_dirs: list[Path] = []

    def open(self, context: RunContext) -> None:
        path = context.run_dir / self.filename
        self._written = 0
        self._made_dirs = [p for p in (context.run_dir, *context.run_dir.parents) if not p.exists()]
        try:
            context.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "xb")  # noqa: SIM115 - held open for the run, closed in close()
        except FileExistsError:
            raise ConfigError(
                "run.dir", f"{str(path)!r} already exists and is never overwritten; choose another run.dir"
            ) from None
        except OSError as exc:
            raise ConfigError("run.dir", f"cannot create {str(path)!r}: {exc.strerror}") from None
        self.path = path

    def emit(self, record: Record) -> None:
        if self._file is None:
            msg = "DiagnosticSink.emit called before open"
            raise RuntimeError(msg)
        line = {"timestamp": iso_utc(record.time), "level": record.level, "event": record.event}
        line.update(record.fields())
        line.update(record.diagnostics)
        self._file.write(dumps(strict_fields(line)) + b"\n")
        self._written += 1
        if isinstance(record, _FLUSH_ON):
            self._file.flush()

    def close(self) -> None:
        """Flush, fsync and close; a file that never received a record is removed with the
        directories ``open`` created, so a run that never started leaves nothing behind."""
        f, self._file = self._file, None
        if f is None:
            return
        try:
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()
        if self._written == 0 and self.path is not None:
            self.path.unlink(missing_ok=True)
            for directory in self._made_dirs:  # deepest first
                with contextlib.suppress(OSError):  # not empty: another sink wrote there
                    directory.rmdir()
