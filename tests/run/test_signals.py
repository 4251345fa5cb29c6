"""Real subprocesses: a signal ends the run after the current step; a crash ends it as failed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.children import CHILD_TIMEOUT, CRASH_MESSAGE, Child, popen, write_crashing_task
from tests.helpers.paths import ROOT
from tests.helpers.servers import wait_until

pytestmark = pytest.mark.slow

CONFIG = ROOT / "configs" / "default.yaml"


RUN_END_KEYS = frozenset(
    {"timestamp", "level", "event", "run_id", "schema_version", "rank", "world_size", "attempt", "status", "reason", "epoch", "step",
     "items_total", "duration_seconds"}
)  # fmt: skip
"""The fields of a run.end line (the schema's required ones; ``nonfinite`` only for a non-finite duration)."""
PER_SINK_KEYS = frozenset({"dropped"})
"""Fields each sink writes for itself: the records *it* dropped since its previous line."""


def assert_same_run_end(stdout_end: dict[str, Any], diag_end: dict[str, Any]) -> None:
    """The diagnostic file's run.end line holds exactly the fields and values of stdout's, apart
    from each sink's own ``dropped`` count."""
    assert (stdout_end["event"], diag_end["event"]) == ("run.end", "run.end")
    assert set(stdout_end) - PER_SINK_KEYS == RUN_END_KEYS
    assert set(diag_end) - PER_SINK_KEYS == RUN_END_KEYS
    assert {k: diag_end[k] for k in RUN_END_KEYS} == {k: stdout_end[k] for k in RUN_END_KEYS}


def _start(tmp_path: Path, *extra: str, pythonpath: str | None = None) -> Child:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return popen(
        [sys.executable, "-m", "traintel", "train", "--config", str(CONFIG),
         "--set", f"run.dir={tmp_path / 'run'}", "--set", "sinks.prometheus.port=0", *extra],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("sig", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")]
)
def test_signal_finishes_the_step_and_ends_the_run(tmp_path: Path, sig: int, code: int, name: str) -> None:
    proc = _start(tmp_path, "--set", "trainer.max_epochs=100000")
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(json.loads(line))
        if lines[-1]["event"] == "train.step" and lines[-1]["step"] >= 3:
            proc.send_signal(sig)
            break
    rest = proc.stdout.read()  # through the same buffered reader as the loop above
    proc.wait(timeout=10)
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    lines += [json.loads(x) for x in rest.splitlines()]
    assert proc.returncode == code, stderr
    end = lines[-1]
    assert (end["event"], end["status"], end["reason"]) == ("run.end", "terminated", name)
    steps = [x for x in lines if x["event"] == "train.step"]
    assert end["step"] == steps[-1]["step"]  # every finished step was reported: every=1 in the config
    diag = [json.loads(x) for x in (tmp_path / "run" / "diagnostic.jsonl").read_text().splitlines()]
    assert [x["event"] for x in diag].count("run.end") == 1
    assert_same_run_end(end, diag[-1])


def test_a_crash_in_training_ends_the_run_as_failed(tmp_path: Path) -> None:
    write_crashing_task(tmp_path)
    proc = _start(
        tmp_path,
        "--set",
        "task.factory=crashing:make_task",
        "--set",
        "task.params={}",
        pythonpath=str(tmp_path),
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err == f"traintel: error: training failed: RuntimeError: {CRASH_MESSAGE}\n"
    lines = [json.loads(x) for x in out.splitlines()]
    end = lines[-1]
    assert (end["event"], end["level"], end["status"], end["reason"], end["step"]) == (
        "run.end", "error", "failed", f"RuntimeError: {CRASH_MESSAGE}", 2,
    )  # fmt: skip
    diag_end = json.loads((tmp_path / "run" / "diagnostic.jsonl").read_text().splitlines()[-1])
    assert diag_end == end


def test_sigterm_while_lingering_stops_serving_and_exits_0(tmp_path: Path) -> None:
    proc = _start(tmp_path, "--set", "trainer.max_epochs=1", "--set", "sinks.prometheus.linger_seconds=600")
    assert proc.stdout is not None
    for line in proc.stdout:
        if json.loads(line)["event"] == "run.end":
            break
    proc.send_signal(signal.SIGTERM)
    proc.stdout.read()
    proc.wait(timeout=10)  # far less than the 600 s linger
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    assert proc.returncode == 0, stderr


_SLOW_EVAL = """
import sys
import time
from traintel.tasks.forecast import make_task as base

class Slow:
    def __init__(self, loader):
        self.loader = loader
        self.passes = 0
    def __iter__(self):
        self.passes += 1
        sys.stderr.write(f"evaluation {self.passes} has begun\\n")  # the test waits for this line
        sys.stderr.flush()
        for batch in self.loader:
            time.sleep(0.2)
            yield batch

def make_task():
    task = base(train_samples=96)
    task.val_loader = Slow(task.val_loader)
    return task
"""


def test_sigterm_during_evaluation_stops_it_and_ends_the_run(tmp_path: Path) -> None:
    (tmp_path / "slow_eval.py").write_text(_SLOW_EVAL)
    proc = _start(
        tmp_path, "--set", "task.factory=slow_eval:make_task", "--set", "task.params={}",
        "--set", "trainer.max_epochs=50", pythonpath=str(tmp_path),
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    seen = []
    for line in proc.stdout:
        seen.append(json.loads(line))
        if seen[-1]["event"] == "train.epoch" and seen[-1]["epoch"] == 2:
            break
    for text in proc.stderr:  # inside epoch 2's evaluation (8 batches of 0.2 s)
        if text == "evaluation 2 has begun\n":
            proc.send_signal(signal.SIGTERM)
            break
    else:
        raise AssertionError(f"epoch 2's evaluation never began: exit {proc.wait(timeout=10)}, {seen[-3:]}")
    seen += [json.loads(x) for x in proc.stdout.read().splitlines()]
    assert proc.wait(timeout=10) == 143
    events = [(x["event"], x.get("epoch")) for x in seen]
    assert events[-2:] == [("train.epoch", 2), ("run.end", 2)]
    assert ("eval.epoch", 2) not in events  # a partial evaluation is not reported as a mean
    assert (seen[-1]["status"], seen[-1]["reason"]) == ("terminated", "SIGTERM")


_LINGERING_THREAD = """
import sys
import threading

from traintel.tasks.forecast import make_task as base


def wait_past_main():
    threading.main_thread().join()  # returns once the interpreter's teardown has begun
    sys.stderr.write("the main thread has ended\\n")
    sys.stderr.flush()
    threading.Event().wait()  # a thread that never ends: the interpreter waits for it


def make_task():
    threading.Thread(target=wait_past_main).start()
    return base(train_samples=96, val_samples=0)
"""


def _wait_for_the_end(proc: Child) -> None:
    """Wait for the process a signal was just sent to; it is killed, and the test fails, when it is
    still running 30 s later."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the signal did not end the process") from None


@pytest.mark.parametrize(
    ("stopped", "code", "said"),
    [(True, 143, "traintel: SIGTERM while stopping: exiting at once\n"), (False, 0, "")],
    ids=["stopped-run", "completed-run"],
)
def test_a_signal_while_the_interpreter_waits_for_a_thread_exits_at_once_with_the_runs_status(
    tmp_path: Path, stopped: bool, code: int, said: str
) -> None:
    """After ``main`` returned, a thread of the task keeps the process alive (the interpreter waits
    for it): a signal then exits at once with the status the process was exiting with."""
    (tmp_path / "lingering.py").write_text(_LINGERING_THREAD)
    proc = _start(
        tmp_path, "--set", "task.factory=lingering:make_task", "--set", "task.params={}",
        "--set", f"trainer.max_epochs={100000 if stopped else 1}", pythonpath=str(tmp_path),
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    if stopped:
        assert json.loads(proc.stdout.readline())["event"] == "run.start"
        proc.send_signal(signal.SIGTERM)
    for line in proc.stdout:
        if json.loads(line)["event"] == "run.end":
            break
    assert proc.stderr.readline() == "the main thread has ended\n"
    proc.send_signal(signal.SIGTERM)
    _wait_for_the_end(proc)
    assert (proc.returncode, proc.stderr.read()) == (code, said)


_SLOW_TEARDOWN = """
import atexit
import threading

from traintel.tasks.forecast import make_task as base


def make_task():
    atexit.register(threading.Event().wait)  # a teardown that never ends
    return base(train_samples=96, val_samples=0)
"""


def test_a_signal_after_the_end_leaves_at_once_without_the_interpreters_teardown(tmp_path: Path) -> None:
    """A signal while the exporter lingers after ``run.end`` stops serving, and the process leaves at
    once with the run's status: it does not go through the teardown (here, an atexit function of
    the task's that never returns)."""
    (tmp_path / "slow_teardown.py").write_text(_SLOW_TEARDOWN)
    proc = _start(
        tmp_path, "--set", "task.factory=slow_teardown:make_task", "--set", "task.params={}",
        "--set", "trainer.max_epochs=1", "--set", "sinks.prometheus.linger_seconds=600",
        pythonpath=str(tmp_path),
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        if json.loads(line)["event"] == "run.end":
            break
    proc.send_signal(signal.SIGTERM)
    _wait_for_the_end(proc)
    assert (proc.returncode, proc.stdout.read(), proc.stderr.read()) == (0, "", "")


def test_a_second_signal_in_the_interpreters_last_teardown_keeps_the_status(tmp_path: Path) -> None:
    """The interpreter's last teardown (after the atexit functions) takes the Python handlers away;
    a second SIGTERM sent once the process no longer catches SIGTERM must not kill it by the
    signal: it exits 143, as the first one asked."""
    from tests.helpers.signals import bits, signal_mask

    proc = _start(tmp_path, "--set", "trainer.max_epochs=100000")
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline())["event"] == "run.start"
    proc.send_signal(signal.SIGTERM)
    for line in proc.stdout:
        if json.loads(line)["event"] == "run.end":
            break
    deadline = time.monotonic() + 30
    while proc.poll() is None and signal_mask(proc.pid, "SigCgt") & bits(signal.SIGTERM):
        assert time.monotonic() < deadline, "SIGTERM still caught 30 s after run.end"
        time.sleep(0.0005)
    assert proc.poll() is None, "exited before its last teardown was seen"
    proc.send_signal(signal.SIGTERM)
    proc.stdout.read()
    assert proc.wait(timeout=CHILD_TIMEOUT) == 143


def test_a_second_signal_of_another_kind_while_stopping_exits_with_the_first_ones_status(
    tmp_path: Path,
) -> None:
    """SIGINT stops the run; a SIGTERM while the step still runs (asleep) exits at once, with SIGINT's 130.
    (Sent in this order, SIGINT is handled first even when both are pending: lower numbers first.)"""
    from tests.helpers.resume import paused

    proc = paused(tmp_path, call=5, seconds=120)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=CHILD_TIMEOUT)
    took = time.monotonic() - sent
    # SIGTERM comes while SIGINT is pending on the main thread, which sleeps in the paused forward
    # call: it must still be acted on at once, not after the pause, and after SIGINT (traintel's
    # threads block both, so neither lands on another thread and overtakes the other)
    assert took < 60, f"exited {took:.0f} s after the second signal (the step pauses 120 s)"
    assert (proc.returncode, err.splitlines()[-1]) == (
        130,
        "traintel: SIGTERM while stopping: exiting at once",
    )


def test_a_signal_the_kernel_gives_another_thread_reaches_the_handler_at_once() -> None:
    """While the main thread sleeps in a system call, a stop signal delivered to another thread (the
    kernel does so when the main thread has one pending already) still runs the handler at once:
    the watcher wakes the main thread. The handler raises here, which ends the sleep."""
    from traintel.run.signals import handled

    class Woken(Exception):
        pass

    def callback(name: str) -> None:
        raise Woken(name)

    idle = threading.Event()
    bystander = threading.Thread(target=idle.wait, name="bystander")  # like a sink's writer thread
    bystander.start()
    main = threading.get_native_id()

    def send() -> None:
        # once the main thread sleeps, give SIGTERM to the bystander thread only
        stat = Path(f"/proc/self/task/{main}/stat")
        wait_until(
            lambda: stat.read_text().rpartition(")")[2].split()[0] == "S", "the main thread never slept"
        )
        assert bystander.ident is not None
        signal.pthread_kill(bystander.ident, signal.SIGTERM)

    sender = threading.Thread(target=send)
    started = time.monotonic()
    try:
        with handled(callback):
            sender.start()
            with pytest.raises(Woken, match="SIGTERM"):
                time.sleep(60)
    finally:
        idle.set()
        bystander.join()
        sender.join()
    took = time.monotonic() - started
    assert took < 30, f"the handler ran {took:.0f} s after the signal, when the sleep ended"
