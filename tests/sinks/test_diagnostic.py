"""The diagnostic file: rotation, a full disk, and user strings that must not break a line."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import BinaryIO

import torch

from tests.helpers.runs import quiet_config
from tests.helpers.tasks import make_batches, make_model
from traintel.run.api import build
from traintel.sinks import DiagnosticSink, JsonSink, MemorySink
from traintel.task import Task
from traintel.testing import batch_record, run_context


def test_rotation_keeps_whole_lines_and_the_newest_backups(tmp_path: Path) -> None:
    sink = DiagnosticSink(max_bytes=1000, backups=2)
    sink.open(run_context(tmp_path))
    for i in range(1, 61):
        sink.emit(batch_record(batch=i, batches=None))
    sink.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["diagnostic.jsonl", "diagnostic.jsonl.1", "diagnostic.jsonl.2"]
    parts = [tmp_path / "diagnostic.jsonl.2", tmp_path / "diagnostic.jsonl.1", tmp_path / "diagnostic.jsonl"]
    batches = [json.loads(line)["batch"] for p in parts for line in p.read_text().splitlines()]
    assert batches == list(range(batches[0], 61))  # oldest part first, contiguous, ending with the last
    assert all(p.stat().st_size <= 1000 for p in parts)


class _FullDisk(DiagnosticSink):
    def _open_file(self, path: Path) -> BinaryIO:
        super()._open_file(path).close()
        return open("/dev/full", "wb")


def test_a_disk_that_stays_full_is_reported_once_training_goes_on_and_the_lost_lines_are_counted(
    tmp_path: Path,
) -> None:
    stdout = io.BytesIO()
    mem = MemorySink()
    diagnostic = _FullDisk()
    cfg = quiet_config(tmp_path, accumulation_steps=2, max_epochs=3)
    run = build(cfg, Task(model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches([4] * 4)),
                sinks=[diagnostic, mem, JsonSink(stdout)])  # fmt: skip
    end = run.run()
    assert end.status == "completed"
    assert len(mem.of("train.step")) == 6  # the other sinks lost nothing
    errors = [json.loads(x) for x in stdout.getvalue().splitlines() if b'"sink.error"' in x]
    assert [(e["sink"], e["error"]) for e in errors] == [
        (
            "diagnostic",
            f"OSError: cannot write {str(tmp_path / 'run' / 'diagnostic.jsonl')!r}: OSError: [Errno 28] No space left on device; retrying",
        )
    ]
    assert run.fanout.errors["diagnostic"] == 1
    # never written, each tried until the end: run.start, 12 batch, 6 step, 3 epoch records, run.end
    assert diagnostic.dropped == 23


def test_user_strings_never_break_a_line(tmp_path: Path) -> None:
    name = 'quote " backslash \\ newline \n tab \t ünïcødé 训练 \u2028'
    cfg = quiet_config(tmp_path, accumulation_steps=2)
    cfg["run"]["name"] = name
    cfg["sinks"]["diagnostic"]["enabled"] = True
    stdout = io.BytesIO()
    build(cfg, Task(model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches([4] * 2)),
          sinks=[JsonSink(stdout)]).run()  # fmt: skip
    for raw in (stdout.getvalue(), (tmp_path / "run" / "diagnostic.jsonl").read_bytes()):
        lines = raw.split(b"\n")
        assert lines[-1] == b""
        records = [json.loads(x) for x in lines[:-1]]
        assert [r["event"] for r in records] == ["run.start", "train.batch", "train.batch", "train.step",
                                                 "train.epoch", "run.end"]  # fmt: skip
        assert records[0]["name"] == name
