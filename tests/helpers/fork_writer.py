"""A child that imports torch once, then forks one checkpoint writer per round for a test to kill
with SIGKILL in the middle of its writes (``kill -9`` crash-safety tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.helpers.children import CHILD_TIMEOUT, child_env
from tests.helpers.paths import ROOT

SCRIPT = textwrap.dedent(
    """\
    import os
    import sys
    from pathlib import Path

    import torch

    from traintel.run import checkpoint

    torch.set_num_threads(1)  # no thread pool across fork
    directory, size = Path(sys.argv[1]), int(sys.argv[2])


    def say(line):  # one write(2) of under PIPE_BUF bytes: a kill never leaves half a line
        os.write(1, (line + "\\n").encode())


    def work(step):
        base = torch.arange(size, dtype=torch.float32)
        say(f"started {os.getpid()}")
        while True:
            state = {"format": checkpoint.FORMAT, "step": step, "weights": base + step}
            WRITE
            say(f"done {step}")
            step += 1


    say("ready")
    for line in sys.stdin:  # one writer at a time, each from the step it is given
        pid = os.fork()
        if pid == 0:
            try:
                work(int(line))
            finally:
                os._exit(70)
        _, status = os.waitpid(pid, 0)
        say(f"exit {os.waitstatus_to_exitcode(status)}")
    """
)
"""The server; ``WRITE`` stands for the statements that write the state of ``step``."""


class ForkWriter:
    """The ``SCRIPT`` process: each writer writes ``{"format", "step", "weights": arange(size) + step}``
    with ``write`` (Python statements over ``directory``, ``step`` and ``state``) for growing steps;
    ``kill_writer(step, delay)`` starts one from ``step``, kills it with SIGKILL ``delay`` seconds
    after it started, and returns the steps it reported done."""

    def __init__(self, tmp_path: Path, directory: Path, size: int, write: str) -> None:
        script = tmp_path / "fork_writer.py"
        script.write_text(
            SCRIPT.replace("WRITE", write.strip().replace("\n", "\n        ")), encoding="utf-8"
        )
        self.stderr_path = tmp_path / "fork_writer.stderr"
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), str(directory), str(size)],
                cwd=tmp_path, env=child_env(ROOT), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=stderr, text=True, bufsize=1,
            )  # fmt: skip
        assert self.line() == "ready"

    def line(self) -> str:
        assert self.proc.stdout is not None
        text = self.proc.stdout.readline()
        assert text, f"the fork server ended: {self.stderr_path.read_text(errors='replace')}"
        return text.rstrip("\n")

    def kill_writer(self, step: int, delay: float) -> list[int]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{step}\n")
        self.proc.stdin.flush()
        word, pid = self.line().split()
        assert word == "started"
        time.sleep(delay)  # the kill's random moment, not a wait for something
        os.kill(int(pid), signal.SIGKILL)
        reported: list[int] = []
        while (text := self.line()).startswith("done "):
            reported.append(int(text.split()[1]))
        assert text == "exit -9"  # the writer was killed by SIGKILL, it did not end otherwise
        return reported

    def close(self) -> int:
        """End the server (its stdin closes); returns its exit code."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=CHILD_TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
        return self.proc.returncode
