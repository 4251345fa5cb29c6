"""A user's SQLite plug-in sink: one row per ``train.step`` (its attempt and rank too), written on a
thread of its own (``threaded``) and appended to across attempts."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from traintel.records import Record, StepRecord
from traintel.sinks.base import RunContext

SCHEMA = "CREATE TABLE IF NOT EXISTS steps (step INTEGER, attempt INTEGER, rank INTEGER, loss REAL, lr REAL)"


class SqliteSink:
    name = "sqlite"
    threaded = True

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def open(self, context: RunContext) -> None:
        path = Path(self.path) if self.path else context.run_dir / "steps.sqlite"
        self.path = str(path)
        self._db = sqlite3.connect(path, check_same_thread=False)  # opened here, written on its thread
        self._db.execute(SCHEMA)
        self._db.commit()

    def emit_many(self, records: Sequence[Record]) -> None:
        assert self._db is not None
        rows = [(r.step, r.attempt, r.rank, r.loss, r.lr) for r in records if isinstance(r, StepRecord)]
        if rows:
            self._db.executemany("INSERT INTO steps VALUES (?, ?, ?, ?, ?)", rows)
            self._db.commit()

    def emit(self, record: Record) -> None:
        self.emit_many((record,))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def rows(path: Path) -> list[tuple[int, int, int, float, float]]:
    """Every row, in the order written."""
    with sqlite3.connect(path) as db:
        return list(db.execute("SELECT step, attempt, rank, loss, lr FROM steps ORDER BY rowid"))
