"""A traintel sink: one CSV row (step, epoch, items, loss, lr) per optimizer step."""

import csv
from pathlib import Path

from traintel.records import Record
from traintel.sinks import RunContext


class CsvSink:
    name = "csv"
    columns = ("step", "epoch", "items", "loss", "lr")

    def __init__(self, path: str | None = None) -> None:
        self.path, self._file = path, None

    def open(self, context: RunContext) -> None:
        path = Path(self.path) if self.path else context.run_dir / "steps.csv"
        if context.rank > 0:  # with `ranks: all`, each rank writes its own file
            path = path.with_name(f"{path.stem}.rank{context.rank}{path.suffix}")
        resumed = context.attempt > 0 and path.exists()  # a resumed run appends
        mode = "a" if resumed else "x"  # line-buffered: a row is on disk once written, even after kill -9
        self.path, self._file = str(path), path.open(mode, buffering=1, newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if not resumed:
            self._writer.writerow(self.columns)

    def emit(self, record: Record) -> None:
        if record.event == "train.step":
            self._writer.writerow([getattr(record, c) for c in self.columns])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
