"""A stop signal at any moment of ``traintel train``'s start-up: one line on stderr, the signal's
status, nothing written; or, once the run has opened its sinks, a run that starts and ends as
terminated. Real children, real signals."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.children import CHILD_TIMEOUT, child_env
from tests.helpers.paths import ROOT
from tests.helpers.servers import free_port
from tests.helpers.signals import bits, signal_mask

pytestmark = pytest.mark.slow

CONFIG = ROOT / "configs" / "default.yaml"
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STATUS = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGHUP: 129}


def startup_line(sig: signal.Signals) -> str:
    return f"traintel: error: {sig.name} during start-up: stopped before training\n"


def wait_for_handlers(proc: subprocess.Popen[str]) -> None:
    """Wait until the child catches SIGTERM, SIGINT and SIGHUP: ``traintel train`` has begun its
    start-up (before that, the interpreter's own dispositions apply)."""
    deadline = time.monotonic() + CHILD_TIMEOUT
    while signal_mask(proc.pid, "SigCgt") & bits(*SIGNALS) != bits(*SIGNALS):
        assert proc.poll() is None, f"exited {proc.returncode} before its start-up"
        assert time.monotonic() < deadline, "no stop-signal handlers"
        time.sleep(0.001)


DEFAULT_DISPOSITIONS = (
    "import os, signal, sys\n"
    "for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
    "    signal.signal(sig, signal.SIG_DFL)\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'traintel', *sys.argv[1:]])\n"
)
"""Runs ``traintel ARGS`` with the stop signals' default dispositions: a shell started by ``nohup``
or as a background job ignores SIGHUP or SIGINT, and a process inherits that."""


def start(
    tmp_path: Path, *overrides: str, env: dict[str, str] | None = None, defaults: bool = False
) -> subprocess.Popen[str]:
    """``traintel train`` with the built-in config and ``overrides``; ``defaults``: through
    ``DEFAULT_DISPOSITIONS``, whatever this process ignores."""
    launcher = (
        [sys.executable, "-c", DEFAULT_DISPOSITIONS] if defaults else [sys.executable, "-m", "traintel"]
    )
    cmd = [*launcher, "train", "--config", str(CONFIG),
           "--set", f"run.dir={tmp_path / 'run'}", "--set", "sinks.prometheus.port=0",
           *[a for o in overrides for a in ("--set", o)]]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=tmp_path, env=env or child_env(tmp_path, {"OMP_NUM_THREADS": "1"}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def check_stopped(tmp_path: Path, proc: subprocess.Popen[str], sig: signal.Signals, read: str = "") -> bool:
    """Wait for the child signalled with ``sig`` (``read``: what was read from its stdout already);
    check that it stopped in start-up (one line, the status, nothing written: returns True) or ran
    and ended as terminated (returns False)."""
    rest, err = proc.communicate(timeout=CHILD_TIMEOUT)
    out = read + rest
    if not out:
        assert (proc.returncode, err) == (STATUS[sig], startup_line(sig))
        assert not (tmp_path / "run").exists()
        return True
    records: list[dict[str, Any]] = [json.loads(line) for line in out.splitlines()]
    end = records[-1]
    assert (proc.returncode, err) == (STATUS[sig], "")
    assert (records[0]["event"], end["event"], end["status"], end["reason"]) == (
        "run.start", "run.end", "terminated", sig.name
    )  # fmt: skip
    return False


ROUNDS = 12
"""Signals sent over a start-up, four of each kind."""


def test_a_signal_at_any_moment_of_start_up_is_one_line_and_its_status(tmp_path: Path) -> None:
    """The start-up's length (from its handlers to ``run.start``) is measured first; then each
    round sends a signal at a moment drawn from its own twelfth of that length (110% of it, so
    the last rounds may land in the run), the signals shuffled over the rounds."""
    first = tmp_path / "measure"
    first.mkdir()
    proc = start(first, "trainer.max_epochs=100000")
    assert proc.stdout is not None
    wait_for_handlers(proc)
    began = time.monotonic()
    read = proc.stdout.readline()
    length = time.monotonic() - began
    proc.send_signal(signal.SIGTERM)
    assert check_stopped(first, proc, signal.SIGTERM, read) is False

    draw = random.Random(20261205)
    kinds = [*SIGNALS] * (ROUNDS // len(SIGNALS))
    draw.shuffle(kinds)
    in_start_up = 0
    for n, sig in enumerate(kinds):
        where = tmp_path / f"round{n}"
        where.mkdir()
        proc = start(where, "trainer.max_epochs=100000")
        wait_for_handlers(proc)
        time.sleep(1.1 * length * (n + draw.random()) / ROUNDS)  # the moment under test
        proc.send_signal(sig)
        in_start_up += check_stopped(where, proc, sig)
    assert in_start_up >= ROUNDS // 2, f"only {in_start_up} of {ROUNDS} signals landed in start-up"


TASKS = textwrap.dedent(
    """\
    import multiprocessing
    import os
    import signal
    import sys
    import time

    from traintel.tasks.forecast import make_task as base


    class Closing:
        def __init__(self, name):
            self.name = name

        def __del__(self):
            signal.raise_signal(getattr(signal, self.name))


    def in_a_finalizer(name):
        Closing(name)  # dropped at once: the signal lands inside its finalizer, which cannot raise
        return base(train_samples=64, val_samples=0)


    class SignallingSink:
        name = "signalling"

        def __init__(self):
            signal.raise_signal(signal.SIGTERM)  # built once the run directory is made

        def open(self, context):
            pass

        def emit(self, record):
            pass

        def close(self):
            pass


    def forking():
        ctx = multiprocessing.get_context("fork")
        codes = []
        for sig in (signal.SIGTERM, signal.SIGHUP) * 10:
            child = ctx.Process(target=time.sleep, args=(600,))
            child.start()
            os.kill(child.pid, sig)  # at once: the child may not have let go of the handlers yet
            child.join()
            codes.append(child.exitcode)
        print(f"forked children ended with {sorted(set(codes))}", file=sys.stderr)
        return base(train_samples=64, val_samples=0)
    """
)


@pytest.mark.parametrize("sig", SIGNALS, ids=[s.name for s in SIGNALS])
def test_a_signal_in_code_that_cannot_raise_still_ends_the_start_up_with_one_line(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """The task factory drops an object whose finalizer gets the signal: the interpreter ignores
    what a finalizer raises, so the start-up must end without raising into it."""
    (tmp_path / "user_code.py").write_text(TASKS)
    proc = start(tmp_path, "task.factory=user_code:in_a_finalizer", f"task.params={{name: {sig.name}}}")
    out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    assert (proc.returncode, out, err) == (STATUS[sig], "", startup_line(sig))
    assert not (tmp_path / "run").exists()


def test_a_signal_once_the_run_directory_is_made_leaves_no_directory_behind(tmp_path: Path) -> None:
    """A plug-in sink is built after the run directory (and its missing parents) was made and
    locked, before the sinks open: a signal there still leaves nothing written."""
    (tmp_path / "user_code.py").write_text(TASKS)
    proc = start(
        tmp_path,
        f"run.dir={tmp_path / 'made' / 'run'}",
        "sinks.extra=[{factory: 'user_code:SignallingSink'}]",
    )
    out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    assert (proc.returncode, out, err) == (143, "", startup_line(signal.SIGTERM))
    assert not (tmp_path / "made").exists()


def test_a_process_forked_during_start_up_keeps_its_own_signals(tmp_path: Path) -> None:
    """A task factory forks children and stops them with SIGTERM and SIGHUP at once: they die of
    the signal as without traintel, and the start-up goes on (no line, no exit). traintel starts
    with the default dispositions: one that inherited an ignored SIGHUP (``nohup``) would pass it on
    to the children, which then live on, as they would without traintel."""
    (tmp_path / "user_code.py").write_text(TASKS)
    env = child_env(tmp_path, {"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
    proc = start(
        tmp_path,
        "task.factory=user_code:forking",
        "task.params={}",
        "trainer.max_epochs=1",
        env=env,
        defaults=True,
    )
    try:
        out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack to stderr
        _, err = proc.communicate(timeout=CHILD_TIMEOUT)
        pytest.fail(f"still running after {CHILD_TIMEOUT} s; its threads then:\n{err[-6000:]}")
    assert (proc.returncode, err) == (0, "forked children ended with [-15, -1]\n")
    end = json.loads(out.splitlines()[-1])
    assert (end["event"], end["status"]) == ("run.end", "completed")


def listening(port: int) -> bool:
    """Whether a socket listens on ``port`` (``/proc/net/tcp`` and ``tcp6``, state 0A)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as rows:
            for row in list(rows)[1:]:
                local, state = row.split()[1], row.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_rank_waiting_for_its_peers_stops_at_once(tmp_path: Path, sig: signal.Signals) -> None:
    """Rank 0 of two, started as torchrun starts it, whose peer never comes: it waits in C++ for
    the process group (its store listening), where no Python handler runs, and still stops at
    once with its one line."""
    port = free_port()
    env = child_env(tmp_path, {"OMP_NUM_THREADS": "1", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
    proc = start(tmp_path, env=env)
    deadline = time.monotonic() + CHILD_TIMEOUT
    while not listening(port):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "rank 0 never listened for its peers"
        time.sleep(0.01)
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("still waiting for its peer 30 s after the signal") from None
    assert time.monotonic() - sent < 5
    assert (proc.returncode, out, err) == (STATUS[sig], "", startup_line(sig))
    assert not (tmp_path / "run").exists()


RANK_SCRIPT = textwrap.dedent(
    """\
    #!/bin/sh
    if [ "$RANK" = 1 ]; then
      exec sleep 600  # a rank that has not come yet (still pulling its image, say)
    fi
    exec "$TEST_PYTHON" -m traintel train "$@"
    """
)


def rank_zero(launcher: int) -> tuple[int, int] | None:
    """(pid, MASTER_PORT) of the launcher's worker with RANK=0, once it has started."""
    for task in os.listdir(f"/proc/{launcher}/task"):
        with open(f"/proc/{launcher}/task/{task}/children", encoding="ascii") as children:
            for pid in map(int, children.read().split()):
                try:
                    with open(f"/proc/{pid}/environ", "rb") as raw:
                        env = dict(v.split(b"=", 1) for v in raw.read().split(b"\0") if b"=" in v)
                except OSError:
                    continue
                if env.get(b"RANK") == b"0":
                    return pid, int(env[b"MASTER_PORT"])
    return None


def connected_to(pid: int, port: int) -> bool:
    """Whether process ``pid`` has an established TCP connection to ``port`` (its sockets' inodes
    in ``/proc/<pid>/net/tcp`` and ``tcp6``, state 01)."""
    rows: list[list[str]] = []
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        for table in ("tcp", "tcp6"):
            with open(f"/proc/{pid}/net/{table}", encoding="ascii") as lines:
                rows += [row.split() for row in list(lines)[1:]]
    except OSError:
        return False
    return any(
        r[3] == "01" and int(r[2].rsplit(":", 1)[1], 16) == port and f"socket:[{r[9]}]" in inodes
        for r in rows
    )


def test_sigterm_to_torchrun_while_a_rank_waits_for_its_peers_ends_within_seconds(tmp_path: Path) -> None:
    """Under traintel-torchrun, rank 0 waits in the rendezvous (connected to the launcher's store) for
    a rank 1 that never comes: SIGTERM to the launcher stops rank 0 at once with its one line, and
    the launcher exits 143 well before torch's agent would kill it (30 s later)."""
    script = tmp_path / "rank.sh"
    script.write_text(RANK_SCRIPT)
    script.chmod(0o755)
    env = child_env(tmp_path, {"OMP_NUM_THREADS": "1", "TEST_PYTHON": sys.executable})
    proc = subprocess.Popen(
        [sys.executable, "-m", "traintel.cli.torchrun", "--standalone", "--nproc-per-node=2", "--no-python",
         str(script), "--config", str(CONFIG), "--set", f"run.dir={tmp_path / 'run'}",
         "--set", "sinks.prometheus.port=0"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + CHILD_TIMEOUT
    while (found := rank_zero(proc.pid)) is None or not connected_to(*found):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "rank 0 never waited for its peer"
        time.sleep(0.01)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    assert time.monotonic() - sent < 10
    assert (proc.returncode, out) == (143, "")
    assert [line for line in err.splitlines() if line.startswith("traintel")] == [
        startup_line(signal.SIGTERM).rstrip("\n"),
        "traintel.cli.torchrun: exit 143 (terminated)",
    ]
