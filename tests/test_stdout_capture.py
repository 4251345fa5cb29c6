"""``print()`` while the JSON sink owns stdout: each line of text becomes a JSON log line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.children import CHILD_TIMEOUT, child_env
from tests.conftest import strict_object
from traintel.sinks._stdout_capture import StdoutCapture, install, release
from traintel.sinks.json_stdout import JsonSink
from traintel.testing import batch_record, end_record, run_context, step_record

CONFIG = Path(__file__).parent.parent / "configs" / "default.yaml"


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
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False
    )
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
