"""``print()`` while the JSON sink owns stdout: each line of text becomes a JSON log line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.children import child_env, run_child
from tests.helpers.lines import strict_object
from tests.helpers.paths import ROOT
from traintel.sinks.json.capture import StdoutCapture, install, release
from traintel.sinks.json.sink import JsonSink
from traintel.testing import batch_record, end_record, run_context, step_record

CONFIG = ROOT / "configs" / "default.yaml"


def test_text_is_handed_on_a_line_at_a_time() -> None:
    got: list[str] = []
    capture = StdoutCapture(got.append, None)
    print("one", 2, file=capture)
    capture.write("a partial")
    capture.write(" line\nand two\nlines\nheld")
    assert got == ["one 2", "a partial line", "and two", "lines"]
    capture.flush()  # print(..., flush=True): the held text goes out as it is
    capture.flush()
    capture.write("\n")  # an empty line is a line
    assert got == ["one 2", "a partial line", "and two", "lines", "held", ""]


def test_the_buffer_takes_bytes_split_anywhere() -> None:
    got: list[str] = []
    capture = StdoutCapture(got.append, None)
    data = "caf\u00e9 \u2713\n".encode()
    for i in range(len(data)):
        capture.buffer.write(data[i : i + 1])
    capture.buffer.write(b"bad \xff byte\n")
    assert got == ["caf\u00e9 \u2713", "bad \ufffd byte"]


def test_text_written_while_emitting_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    got: list[str] = []

    def emit(text: str) -> None:
        print(f"handler saw {text}", file=capture)  # e.g. a logging handler that prints
        got.append(text)

    capture = StdoutCapture(emit, None)
    capture.write("hello\n")
    assert got == ["hello"]
    assert capsys.readouterr().err == "handler saw hello\n"


def test_a_failing_emit_sends_the_text_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    def emit(_text: str) -> None:
        raise OSError("gone")

    capture = StdoutCapture(emit, None)
    capture.write("kept\n")
    assert capsys.readouterr().err == "kept\n"


def test_release_flushes_and_puts_stdout_back_and_a_held_capture_writes_through() -> None:
    got: list[str] = []
    before = sys.stdout
    previous = io.StringIO()
    sys.stdout = previous
    try:
        capture = install(got.append)
        assert sys.stdout is capture
        print("inside", end="")
        release(capture)
        assert sys.stdout is previous
        assert got == ["inside"]
        capture.write("after\n")  # someone kept a reference (a handler made during the run)
        assert previous.getvalue() == "after\n"
    finally:
        sys.stdout = before


def test_lines_from_threads_stay_whole() -> None:
    got: list[str] = []
    capture = StdoutCapture(got.append, None)

    def worker(n: int) -> None:
        for i in range(200):
            capture.write(f"thread {n} line {i}\n")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(f"thread {n} line {i}" for n in range(4) for i in range(200))


@contextlib.contextmanager
def _stdout_to_file(path: Path) -> Iterator[None]:
    """``sys.stdout`` on a file (stdout redirected: not a terminal), restored afterwards (set in
    the test itself: pytest swaps ``sys.stdout`` between a test's phases)."""
    before = sys.stdout
    with open(path, "w", encoding="utf-8") as out:
        sys.stdout = out
        try:
            yield
        finally:
            sys.stdout = before


@pytest.mark.parametrize("profile", ["default", "ecs"])
def test_the_json_sink_turns_print_into_log_lines_of_the_stdout_logger(tmp_path: Path, profile: str) -> None:
    with _stdout_to_file(tmp_path / "stdout"):
        replaced = sys.stdout
        sink = JsonSink(profile=profile)
        sink.open(run_context(tmp_path / "run"))
        assert sys.stdout is not replaced
        print("hello from user code")
        print("no newline yet", end="")
        sink.emit(end_record())
        sink.close()
        assert sys.stdout is replaced
        print("after the run")  # the sink no longer owns stdout
    lines = (tmp_path / "stdout").read_text().splitlines()
    assert lines[-1] == "after the run"
    parsed = [strict_object(line) for line in lines[:-1]]
    logger, message = ("log.logger", "message") if profile == "ecs" else ("logger", "event")
    assert [(x.get(logger), x[message]) for x in parsed] == [
        ("stdout", "hello from user code"),
        (None, "run.end"),
        ("stdout", "no newline yet"),  # held until the sink closed
    ]
    level = "log.level" if profile == "ecs" else "level"
    assert parsed[0][level] == "info"


def test_a_sink_with_its_own_stream_or_the_console_view_leaves_print_alone(tmp_path: Path) -> None:
    with open(tmp_path / "other", "wb") as other, _stdout_to_file(tmp_path / "stdout"):
        replaced = sys.stdout
        for sink in (
            JsonSink(io.BytesIO()),
            JsonSink(console=True),
            JsonSink(capture=False),
            JsonSink(fd=other.fileno()),  # e.g. a rank's log lines on stderr
        ):
            sink.open(run_context(tmp_path / "run"))
            assert sys.stdout is replaced
            sink.close()


def test_json_lines_at_a_terminal_leave_print_alone(tmp_path: Path) -> None:
    master, terminal = os.openpty()
    before = sys.stdout
    try:
        with open(terminal, "w", encoding="utf-8") as tty:
            sys.stdout = tty
            sink = JsonSink()  # format: json at a terminal
            sink.open(run_context(tmp_path / "run"))
            assert sys.stdout is tty
            sink.close()
    finally:
        sys.stdout = before
        os.close(master)


def test_a_stalled_reader_holds_at_most_the_byte_bound(tmp_path: Path) -> None:
    """Every record kind but the per-step ones is kept; what waits for a pipe nobody reads stays
    within ``queue_bytes`` (counted as the queue holds it), and the drops are counted."""
    r, w = os.pipe()
    sink = JsonSink(fd=w, queue_bytes=1 << 20, close_timeout=0.2)
    sink.open(run_context(tmp_path / "run"))
    writer = sink._writer
    assert writer is not None
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for step in range(10_000):
            sink.emit_many([batch_record(step=step), batch_record(step=step), step_record(step=step + 1)])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert writer.waiting_bytes <= (1 << 20) + 1024
    assert held < 2 * (1 << 20), held
    dropped = sink.dropped
    assert dropped > 10_000  # most batch records, and step records once the whole bound waited
    sink.emit(end_record())
    sink.close()  # the writer stays stuck on the pipe: the queue is given up
    data = b""
    while chunk := os.read(r, 1 << 16):  # what reached the pipe: whole lines
        data += chunk
        if len(data) >= 65536 or not chunk:
            break
    os.close(r)  # the stuck writer gets EPIPE and ends
    assert data.endswith(b"\n")
    assert all(json.loads(line)["event"] in ("train.batch", "train.step") for line in data.splitlines())


_PRINTING_TASK = """
import os

from traintel.tasks.forecast import make_task as base


def make_task():
    task = base(train_samples=96, val_samples=0)
    loss_fn, calls = task.loss_fn, []

    def printing_loss(out, y):
        if not calls:
            print(f"first loss on rank {os.environ['RANK']}")
        calls.append(1)
        return loss_fn(out, y)

    task.loss_fn = printing_loss
    return task
"""


@pytest.mark.slow
def test_print_on_a_rank_above_0_becomes_a_log_line_on_its_stderr(tmp_path: Path) -> None:
    """Under torchrun with ``telemetry.ranks=zero`` stdout carries rank 0's JSON lines only: text
    printed on rank 1 becomes a JSON log line of the ``stdout`` logger on stderr, where that rank's
    warnings go."""
    (tmp_path / "printing.py").write_text(_PRINTING_TASK, encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "traintel", "train", "--config", str(CONFIG), "--set", f"run.dir={tmp_path / 'run'}",
           "--set", "sinks.prometheus.port=0", "--set", "task.factory=printing:make_task",
           "--set", "task.params={}", "--set", "trainer.max_epochs=1"]  # fmt: skip
    env = child_env(tmp_path, {"OMP_NUM_THREADS": "1"})
    proc = run_child(cmd, tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [strict_object(line) for line in proc.stdout.splitlines()]  # every line of stdout is JSON
    assert [x["event"] for x in out if x.get("logger") == "stdout"] == ["first loss on rank 0"]
    assert {x["rank"] for x in out if "rank" in x} == {0}
    assert out[-1]["event"] == "run.end"
    err = [strict_object(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert [(x["logger"], x["event"], x["level"]) for x in err if x.get("logger") == "stdout"] == [
        ("stdout", "first loss on rank 1", "info")
    ]
    assert "first loss on rank 1" not in proc.stdout


def test_a_forked_child_writes_its_own_lines_with_no_held_text_and_free_locks() -> None:
    """A process forked while another thread holds the capture's lock and a partial line is held
    (a DataLoader worker forked mid-print) prints whole lines of its own, without deadlock."""
    read, write = os.pipe()

    def emit(text: str) -> None:
        os.write(write, f"{os.getpid()} {text}\n".encode())

    capture = StdoutCapture(emit, None)
    capture.write("held by the parent, ")
    locked, done = threading.Event(), threading.Event()

    def hold() -> None:
        with capture._lock:
            locked.set()
            done.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    locked.wait()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child process
        try:
            print("printed in the child", file=capture)
            capture.buffer.write("bytes in the child \u2713\n".encode())
            capture.write("no newline")
            capture.flush()
        finally:
            os._exit(0)
    done.set()
    holder.join()
    deadline = time.monotonic() + 30
    while os.waitpid(child, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            raise AssertionError("the forked child hung on the capture's lock")
        time.sleep(0.01)
    capture.write("then ended\n")
    os.close(write)
    with os.fdopen(read, encoding="utf-8") as lines:
        got = lines.read().splitlines()
    assert got == [
        f"{child} printed in the child",
        f"{child} bytes in the child \u2713",
        f"{child} no newline",
        f"{os.getpid()} held by the parent, then ended",
    ]


_WORKERS_TASK = """
import logging

from torch.utils.data import DataLoader, Dataset

from traintel.tasks.forecast import make_task as base


class Printing(Dataset):
    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return 8

    def __getitem__(self, i):
        print(f"sample {i}", end="")
        print(" read in a worker")
        if i % 2:
            logging.getLogger("dataset").warning("sample %d is odd", i)
        return self.inner[i]


def make_task():
    task = base(train_samples=8, val_samples=0)
    task.train_loader = DataLoader(Printing(task.train_loader.dataset), batch_size=2, num_workers=2)
    return task
"""


def train_task(tmp_path: Path, module: str, source: str) -> subprocess.CompletedProcess[str]:
    """``traintel train`` for one epoch of ``module:make_task``, written from ``source`` into ``tmp_path``."""
    (tmp_path / f"{module}.py").write_text(source, encoding="utf-8")
    cmd = [sys.executable, "-m", "traintel", "train", "--config", str(CONFIG), "--set", f"run.dir={tmp_path / 'run'}",
           "--set", "sinks.prometheus.enabled=false", "--set", f"task.factory={module}:make_task",
           "--set", "task.params={}", "--set", "trainer.max_epochs=1"]  # fmt: skip
    env = child_env(tmp_path, {"OMP_NUM_THREADS": "1"})
    return run_child(cmd, tmp_path, env)


@pytest.mark.slow
def test_print_in_forked_dataloader_workers_becomes_log_lines(tmp_path: Path) -> None:
    """Two DataLoader workers (forked: Linux's default) print and warn while the JSON sink owns
    stdout: every line arrives, whole, as a JSON log line on stdout, none on stderr."""
    proc = train_task(tmp_path, "workers", _WORKERS_TASK)
    assert (proc.returncode, proc.stderr) == (0, "")
    out = [strict_object(line) for line in proc.stdout.splitlines()]
    printed = sorted((x["event"], x["level"]) for x in out if x.get("logger") == "stdout")
    assert printed == [(f"sample {i} read in a worker", "info") for i in range(8)]
    warned = sorted((x["event"], x["level"]) for x in out if x.get("logger") == "dataset")
    assert warned == [(f"sample {i} is odd", "warning") for i in (1, 3, 5, 7)]
    assert (out[0]["event"], out[-1]["event"]) == ("run.start", "run.end")


_PRINTING_AFTER_THE_RUN = """
import sys
import threading
import time

from traintel.tasks.forecast import make_task as base


def print_after_the_run():
    held = None
    while held is None or sys.stdout is held:  # until the JSON sink has let go of sys.stdout
        if type(sys.stdout).__name__ == "StdoutCapture":
            held = sys.stdout
        time.sleep(0.001)
    print("printed after the run")
    print("through the capture it kept", file=held, flush=True)
    sys.stdout.buffer.write(b"and as bytes\\n")


def make_task():
    threading.Thread(target=print_after_the_run).start()
    return base(train_samples=64, val_samples=0)
"""


@pytest.mark.slow
def test_text_printed_after_the_run_goes_to_stderr(tmp_path: Path) -> None:
    """A thread of the task prints once the JSON sink has closed (through ``sys.stdout`` and through
    the capture it kept): stdout stays JSON lines ending with run.end, the text is on stderr."""
    proc = train_task(tmp_path, "late", _PRINTING_AFTER_THE_RUN)
    assert (proc.returncode, proc.stderr) == (
        0,
        "printed after the run\nthrough the capture it kept\nand as bytes\n",
    )
    out = [strict_object(line) for line in proc.stdout.splitlines()]
    assert (out[-1]["event"], out[-1]["status"]) == ("run.end", "completed")
