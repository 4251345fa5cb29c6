"""A full disk under the run directory: the diagnostic file keeps whole lines only, counts what it
loses, goes on by itself once there is space again, and so do the checkpoints.

The run directory is on a 3 MiB tmpfs, filled by another file while the run writes and freed
again. Mounting one needs root: where it is not permitted, the tests skip and say so.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers.children import CHILD_TIMEOUT, Child, child_env, popen
from tests.helpers.paths import ROOT
from tests.helpers.servers import free_port, http_get
from traintel.records import SinkErrorRecord
from traintel.run import checkpoint, layout
from traintel.sinks import DiagnosticSink, FanOut, MemorySink
from traintel.task import Task
from traintel.testing import batch_record, epoch_record, run_context, step_record

FULL = "OSError: [Errno 28] No space left on device"
T = TypeVar("T")


@contextlib.contextmanager
def small_tmpfs(where: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs mounted at ``where`` (created), unmounted afterwards; skips where mounting is
    not permitted."""
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        pytest.skip("no mount command to mount a tmpfs with")
    where.mkdir()
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run([umount, "--lazy", str(where)], check=True)


def fill(directory: Path) -> Path:
    """Fill ``directory``'s file system with one new file until no block is free; returns the file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        chunk = bytes(64 * 1024)
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    assert os.statvfs(directory).f_bavail == 0
    return filler


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def returns(call: Callable[[], T], within: float = 30.0) -> list[T]:
    """``call()``'s result in a list, or an empty list if it has not returned within ``within`` seconds."""
    result: list[T] = []
    caller = threading.Thread(target=lambda: result.append(call()), daemon=True)
    caller.start()
    caller.join(within)
    return result


def test_a_write_cut_short_by_a_full_disk_leaves_whole_lines_and_the_file_goes_on_once_there_is_space(
    tmp_path: Path,
) -> None:
    with small_tmpfs(tmp_path / "disk") as disk:
        sink, memory = DiagnosticSink(), MemorySink()
        fanout = FanOut([sink, memory])
        fanout.open(run_context(disk))
        path = disk / "diagnostic.jsonl"
        try:
            fanout.emit(batch_record(batch=1, batches=None))
            assert fanout.durable(10.0)
            assert 0 < path.stat().st_size < 4096  # the file's one page has room for more lines
            filler = fill(disk)
            fanout.emit_many([batch_record(batch=i, batches=None) for i in range(2, 42)])  # over 10 KiB
            assert returns(lambda: fanout.durable(600.0)) == [False]  # at once, not after 600 s
            written = path.read_bytes()
            assert written.endswith(b"\n")  # the part of a line that went in was cut off again
            batches = [json.loads(line)["batch"] for line in written.splitlines()]
            assert 1 < len(batches) < 41 and batches == list(range(1, len(batches) + 1))

            fanout.emit(batch_record(batch=42, batches=None))  # the failure is reported from here
            filler.unlink()
            wait_for(lambda: fanout.durable(10.0), "the file did not go on once there was space")
            batches = [json.loads(line)["batch"] for line in path.read_bytes().splitlines()]
            assert batches == list(range(1, 43))  # every line once, in order
            notices = [(r.sink, r.error) for r in memory.records if isinstance(r, SinkErrorRecord)]
            assert notices == [("diagnostic", f"OSError: cannot write {str(path)!r}: {FULL}; retrying")]
            assert (fanout.errors["diagnostic"], sink.dropped) == (1, 0)
        finally:
            fanout.close()


def test_records_dropped_while_the_disk_is_full_are_counted_and_the_next_line_says_how_many(
    tmp_path: Path,
) -> None:
    with small_tmpfs(tmp_path / "disk") as disk:
        sink, memory = DiagnosticSink(capacity=4), MemorySink()
        fanout = FanOut([sink, memory])
        fanout.open(run_context(disk))
        registry = CollectorRegistry()
        registry.register(fanout.health_collector())
        try:
            filler = fill(disk)  # the file is empty: not even its first line has room
            fanout.emit(step_record(step=1))
            assert returns(lambda: fanout.durable(600.0)) == [False]
            # 1 line waits (the one that failed), 3 more fit the line bound of 4: the third
            # batch record is dropped, the epoch record is kept (never dropped)
            fanout.emit_many(
                [batch_record(step=2), batch_record(step=2), step_record(step=2), batch_record(step=2),
                 epoch_record(step=2)]
            )  # fmt: skip
            assert (fanout.errors["diagnostic"], sink.dropped) == (1, 1)
            families = text_string_to_metric_families(generate_latest(registry).decode())
            samples = {(s.name, s.labels.get("sink")): s.value for f in families for s in f.samples}
            assert samples[("traintel_sink_dropped_records_total", "diagnostic")] == 1.0
            assert samples[("traintel_sink_errors_total", "diagnostic")] == 1.0

            filler.unlink()
            wait_for(lambda: fanout.durable(10.0), "the file did not go on once there was space")
            fanout.emit(step_record(step=3))
        finally:
            fanout.close()
        lines = [json.loads(line) for line in (disk / "diagnostic.jsonl").read_bytes().splitlines()]
        assert [(x["event"], x["step"], x.get("dropped")) for x in lines] == [
            ("train.step", 1, None),  # waited through the outage and was written late
            ("train.batch", 2, None),
            ("train.batch", 2, None),
            ("train.step", 2, None),
            ("train.epoch", 2, 1),  # the line after the dropped one says so
            ("train.step", 3, None),
        ]
        assert [r.sink for r in memory.records if isinstance(r, SinkErrorRecord)] == ["diagnostic"]


class _Gated(torch.nn.Module):
    """A linear model whose training forward calls listed in ``pauses`` write ``paused at N`` on
    stderr and wait until the file ``<gates>/go-N`` exists."""

    def __init__(self, gates: Path, pauses: Sequence[int]) -> None:
        super().__init__()
        self.net = torch.nn.Linear(8, 1)
        self.gates = gates
        self.pauses = set(pauses)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls in self.pauses:
                sys.stderr.write(f"paused at {self.calls}\n")
                sys.stderr.flush()
                gate, deadline = self.gates / f"go-{self.calls}", time.monotonic() + CHILD_TIMEOUT
                while not gate.exists():
                    assert time.monotonic() < deadline, f"{gate} did not appear"
                    time.sleep(0.01)
        out: torch.Tensor = self.net(x)
        return out


def make_task(gates: str, pauses: list[int]) -> Task:
    """96 micro-batches of 4 samples, no evaluation, the model pausing at the forward calls ``pauses``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(384, 8, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)
    return Task(model=_Gated(Path(gates), pauses), loss_fn=torch.nn.functional.mse_loss, train_loader=data)


def _metrics(port: int) -> dict[tuple[str, str | None], float]:
    text = http_get(f"http://127.0.0.1:{port}/metrics").decode()
    return {
        (s.name, s.labels.get("sink")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def _start(tmp_path: Path, run_dir: Path, gates: Path, port: int) -> Child:
    """The run: steps of 4 micro-batches, a checkpoint every 4 steps, pauses at forward calls 17
    (step 5) and 37 (step 10); stdout goes to ``tmp_path/stdout``."""
    config = {
        "run": {"name": "full-disk", "seed": 0},
        "task": {"factory": "tests.sinks.io.test_full_disk:make_task", "params": {"gates": str(gates), "pauses": [17, 37]}},
        "trainer": {"max_epochs": 1, "accumulation_steps": 4, "optimizer": {"name": "sgd", "lr": 0.01},
                    "device": "cpu"},
        "telemetry": {"every": 1, "max_delay_seconds": 0},
        "sinks": {"prometheus": {"enabled": True, "port": port, "linger_seconds": 0}},
        "checkpoint": {"every_steps": 4, "keep": 10},
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with open(tmp_path / "stdout", "wb") as stdout:
        return popen(
            [sys.executable, "-m", "traintel", "train", "-c", "config.yaml", "--set", f"run.dir={run_dir}"],
            cwd=tmp_path, env=child_env(extra={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}),
            stdout=stdout, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip


def _lines(path: Path) -> list[dict[str, Any]]:
    """The whole lines of ``path`` (a line still being written is left out)."""
    text = path.read_text()
    return [json.loads(x) for x in text[: text.rfind("\n") + 1].splitlines()]


def _checkpoints(run_dir: Path) -> list[int]:
    return sorted(c.step for c in checkpoint.complete(run_dir / layout.CHECKPOINT_DIRECTORY, 0))


@pytest.mark.slow
def test_a_run_through_a_full_disk_completes_and_its_checkpoints_resume_once_there_is_space(
    tmp_path: Path,
) -> None:
    """The disk fills before step 5 and is freed before step 10: the checkpoint of step 8 is
    skipped, every later one is taken, and the diagnostic file has every record of the run, whole."""
    gates = tmp_path / "gates"
    gates.mkdir()
    port = free_port()
    with small_tmpfs(tmp_path / "disk") as disk:
        run_dir = disk / "run"
        path = run_dir / "diagnostic.jsonl"
        proc = _start(tmp_path, run_dir, gates, port)
        stderr: list[str] = []
        reader = threading.Thread(target=lambda: stderr.extend(proc.stderr or ()), daemon=True)
        reader.start()
        try:
            wait_for(lambda: "paused at 17\n" in stderr or proc.poll() is not None, "no pause at call 17")
            assert proc.poll() is None, "".join(stderr)
            assert _checkpoints(run_dir) == [4]
            filler = fill(disk)
            (gates / "go-17").touch()

            wait_for(lambda: "paused at 37\n" in stderr or proc.poll() is not None, "no pause at call 37")
            assert proc.poll() is None, "".join(stderr)
            wait_for(
                lambda: any(x["event"] == "sink.error" for x in _lines(tmp_path / "stdout")), "no sink.error"
            )
            filler.unlink()
            wait_for(
                lambda: any(x["event"] == "train.step" and x["step"] == 9 for x in _lines(path)),
                "the diagnostic file did not go on once there was space",
            )
            metrics = _metrics(port)
            assert metrics[("traintel_sink_errors_total", "diagnostic")] == 1.0
            assert metrics[("traintel_sink_dropped_records_total", "diagnostic")] == 0.0  # all written late
            (gates / "go-37").touch()
            assert proc.wait(timeout=CHILD_TIMEOUT) == 0, "".join(stderr)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(10)

        assert _checkpoints(run_dir) == [4, 12, 16, 20, 24]
        lines = _lines(tmp_path / "stdout")
        errors = [(x["sink"], x["error"]) for x in lines if x["event"] == "sink.error"]
        assert errors == [("diagnostic", f"OSError: cannot write {str(path)!r}: {FULL}; retrying")]
        warnings = [x["event"] for x in lines if x.get("logger") == "traintel"]
        assert warnings == [
            "no checkpoint at step 8: the diagnostic file cannot write its records now, or did not within 5 s"
        ]
        raw = path.read_bytes()
        assert raw.endswith(b"\n")
        records = [json.loads(x) for x in raw.splitlines()]  # every line whole
        events = [x["event"] for x in records]
        assert (events[0], events[-3:]) == ("run.start", ["train.epoch", "checkpoint", "run.end"])
        assert (events.count("train.batch"), events.count("train.step"), len(events)) == (96, 24, 128)
        assert [x["step"] for x in records if x["event"] == "checkpoint"] == [4, 12, 16, 20, 24]
        assert [x["step"] for x in records if x["event"] == "train.step"] == list(range(1, 25))
        assert [x["batch"] for x in records if x["event"] == "train.batch"] == list(range(1, 97))
        assert [x for x in records if "dropped" in x] == []  # nothing was lost
