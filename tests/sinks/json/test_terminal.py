"""A person at a terminal gets a console view and a progress bar; a pipe gets JSON (tested elsewhere)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def test_tty_gets_console_lines_and_a_progress_bar(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # tqdm needs a width
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "traintel", "train", "--set", f"run.dir={tmp_path / 'run'}",
         "--set", "trainer.max_epochs=2", "--set", "telemetry.every=1", "--set", "sinks.prometheus.port=0"],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd=tmp_path,
    )  # fmt: skip
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO once the child has closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = ANSI.sub("", b"".join(chunks).decode())
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    assert not any(line.startswith("{") for line in lines)  # no JSON on a terminal
    events = [m.group(1) for line in lines if (m := re.match(r"\d\d:\d\d:\d\d \[\w+\s*\] (\S+)", line))]
    assert events == ["run.start", "train.epoch", "eval.epoch", "train.epoch", "eval.epoch", "run.end"]
    assert any(re.search(r"Epoch \[2/2\]: \[11/11\] 100%.*loss=\d", line) for line in lines)
    assert "status=completed" in next(line for line in lines if " run.end " in line)
    # the diagnostic file is unaffected by the terminal view: every record is there
    assert (tmp_path / "run" / "diagnostic.jsonl").read_text().count('"event":"train.step"') == 22
