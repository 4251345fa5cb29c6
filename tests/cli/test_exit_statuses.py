"""Exit statuses of the awkward cases: signals during start-up and SIGHUP, user code that calls
sys.exit or breaks its contract while training, a closed stdout, a run directory deleted mid-run.

Every case runs ``python -m traintel train`` as a real subprocess and checks the exact status, the
exact stderr line and what reached stdout and the run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.children import CHILD_TIMEOUT, Child, child_env, popen
from tests.helpers.paths import ROOT
from tests.helpers.servers import wait_until

CONFIG = ROOT / "configs" / "default.yaml"
TORCH_DIRECTORY = f"{Path(torch.__file__).parent}{os.sep}"

TASKS = textwrap.dedent(
    """\
    import pathlib
    import time

    from traintel.tasks.forecast import make_task as base


    def slow(**params):
        pathlib.Path("factory-started").touch()
        time.sleep(60)  # a factory downloading its data
        return base(**params)


    def fractional(**params):
        task = base(**params)
        task.count_items = lambda batch: 2.7
        return task


    class ExitingSink:
        name = "exiting"

        def open(self, context):
            pass

        def emit(self, record):
            if record.event == "train.epoch":
                raise SystemExit(3)

        def close(self):
            pass
    """
)


def _start(tmp_path: Path, *overrides: str, stdout: Any = subprocess.PIPE, fresh: bool = False) -> Child:
    (tmp_path / "user_code.py").write_text(TASKS)
    cmd = [sys.executable, "-m", "traintel", "train", "--config", str(CONFIG), "--set", f"run.dir={tmp_path / 'run'}",
           "--set", "sinks.prometheus.port=0", *[a for o in overrides for a in ("--set", o)]]  # fmt: skip
    env = child_env(tmp_path, {"OMP_NUM_THREADS": "1"})
    return popen(cmd, cwd=tmp_path, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True, fresh=fresh)


def _records(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def _importing_torch(pid: int) -> bool:
    """Whether ``pid`` catches SIGTERM (``traintel train``'s start-up has begun: ``remember_early``)
    and has mapped a library of torch's (its import is under way, or done)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:  # gone
        return False
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & 1 << (signal.SIGTERM - 1)) and TORCH_DIRECTORY in maps


def _wait_for_event(proc: Child, event: str) -> list[dict[str, Any]]:
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(json.loads(line))
        if seen[-1]["event"] == event:
            return seen
    raise AssertionError(f"no {event} on stdout")


@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_a_signal_during_a_slow_task_factory_ends_the_start_up_within_a_second(
    tmp_path: Path, sig: signal.Signals, status: int
) -> None:
    proc = _start(tmp_path, "task.factory=user_code:slow", fresh=True)
    deadline = time.monotonic() + CHILD_TIMEOUT
    while not (tmp_path / "factory-started").exists():  # torch is imported; the factory sleeps
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    sent = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    assert time.monotonic() - sent < 1.0
    assert (proc.returncode, out, err) == (
        status, "", f"traintel: error: {sig.name} during start-up: stopped before training\n"
    )  # fmt: skip
    assert not (tmp_path / "run").exists()  # nothing was written


def test_a_signal_while_importing_torch_ends_the_start_up_at_once(tmp_path: Path) -> None:
    proc = _start(tmp_path, fresh=True)
    wait_until(
        lambda: _importing_torch(proc.pid) or proc.poll() is not None,
        "the child never caught SIGTERM with a library of torch's loaded", CHILD_TIMEOUT, interval=0.01,
    )  # fmt: skip
    assert proc.poll() is None, (
        f"exited {proc.returncode} before it was seen importing torch: {proc.communicate()[1]!r}"
    )
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    assert (proc.returncode, out, err) == (
        143,
        "",
        "traintel: error: SIGTERM during start-up: stopped before training\n",
    )
    assert not (tmp_path / "run").exists()


def test_sighup_stops_a_run_like_sigterm_with_status_129(tmp_path: Path) -> None:
    proc = _start(tmp_path, "trainer.max_epochs=100000")
    _wait_for_event(proc, "train.step")
    proc.send_signal(signal.SIGHUP)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()  # the rest, through the same buffered reader
    assert proc.wait(timeout=CHILD_TIMEOUT) == 129, proc.stderr.read()
    end = _records(out)[-1]
    assert (end["event"], end["status"], end["reason"]) == ("run.end", "terminated", "SIGHUP")
    diag_end = json.loads((tmp_path / "run" / "diagnostic.jsonl").read_text().splitlines()[-1])
    assert diag_end["event"] == "run.end" and diag_end["reason"] == "SIGHUP"


def test_a_fractional_item_count_fails_the_run_naming_the_value(tmp_path: Path) -> None:
    proc = _start(tmp_path, "task.factory=user_code:fractional")
    out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    reason = "TypeError: count_items returned 2.7 (float); it must return an integer"
    assert (proc.returncode, err) == (1, f"traintel: error: training failed: {reason}\n")
    end = _records(out)[-1]
    assert (end["event"], end["status"], end["reason"], end["step"]) == ("run.end", "failed", reason, 0)


def test_sys_exit_in_a_plugin_sink_is_that_sinks_failure(tmp_path: Path) -> None:
    proc = _start(tmp_path, "trainer.max_epochs=2", "sinks.extra=[{factory: 'user_code:ExitingSink'}]")
    out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    assert (proc.returncode, err) == (0, "")
    records = _records(out)
    errors = [(r["sink"], r["error"]) for r in records if r["event"] == "sink.error"]
    assert errors == [("exiting", "SystemExit: 3")]
    assert (records[-1]["event"], records[-1]["status"]) == ("run.end", "completed")


def test_a_closed_stdout_is_bad_input(tmp_path: Path) -> None:
    done = subprocess.run(
        f"exec {sys.executable} -m traintel train --config {CONFIG} --set run.dir={tmp_path / 'run'} >&-",
        check=False, shell=True, cwd=tmp_path, env=child_env(tmp_path), capture_output=True, text=True, timeout=CHILD_TIMEOUT,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (
        2, "traintel: error: sinks.json: stdout is closed; give the process a stdout or set sinks.json.enabled=false\n"
    )  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_run_directory_deleted_mid_run_is_reported(tmp_path: Path) -> None:
    proc = _start(tmp_path, "trainer.max_epochs=100000")
    _wait_for_event(proc, "train.step")
    shutil.rmtree(tmp_path / "run")
    deadline = time.monotonic() + 20
    assert proc.stdout is not None
    errors = []
    for line in proc.stdout:
        record = json.loads(line)
        if record["event"] == "sink.error":
            errors.append((record["sink"], record["error"]))
            break
        assert time.monotonic() < deadline, "no sink.error within 20 s"
    proc.send_signal(signal.SIGTERM)
    proc.stdout.read()
    proc.wait(timeout=CHILD_TIMEOUT)
    path = tmp_path / "run" / "diagnostic.jsonl"
    assert errors == [
        (
            "diagnostic",
            f"OSError: {str(path)!r} was deleted while the run wrote it; the records written since are lost",
        )
    ]
