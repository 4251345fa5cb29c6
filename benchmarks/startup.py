"""Start-up cost: ``traintel --help``, ``traintel config show`` and time to the first optimizer step.

What: each command runs as a fresh subprocess, ``--repeats`` times; the table shows
medians. For ``train`` the clock runs from just before the process is spawned until
the first optimizer step ends (the ``timestamp`` of the first ``train.step`` line,
``telemetry.every=1``), so it covers interpreter start, imports (torch, ignite), config,
task build, sinks and one step.

Why: ``--help`` and ``config show`` are used interactively and in container health
and debug commands; they must not pay for importing torch (target: under 0.3 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}


def time_command(args: list[str]) -> float:
    """Wall seconds of one run of ``python -m traintel ARGS`` to exit."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "traintel", *args], env=_env(), capture_output=True, check=True)
    return time.perf_counter() - t0


def time_to_first_step() -> float:
    """Seconds from spawning ``traintel train`` to the end of its first optimizer step: the first
    ``train.step`` line's ``timestamp`` (when that step ended) against the wall clock at spawn, so
    the time the line then spends in the writer's queue is not counted."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            sys.executable, "-m", "traintel", "train", "--config", str(ROOT / "configs" / "default.yaml"),
            "--set", f"run.dir={tmp}/run", "--set", "telemetry.every=1", "--set", "sinks.prometheus.port=0",
        ]  # fmt: skip
        t0 = time.time()
        proc = subprocess.Popen(
            argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert proc.stdout is not None
        first = float("nan")
        for line in proc.stdout:
            record = json.loads(line)
            if record["event"] == "train.step":
                ended = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
                first = ended - t0
                break
        proc.kill()
        proc.wait()
        return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cases = {
        "traintel --help": lambda: time_command(["--help"]),
        "traintel config show": lambda: time_command(["config", "show"]),
        "traintel train: spawn to first optimizer step": time_to_first_step,
    }
    print(f"| command | median seconds ({args.repeats} runs) |")
    print("|---|---:|")
    for name, fn in cases.items():
        fn()  # warm the file cache
        print(f"| {name} | {statistics.median(fn() for _ in range(args.repeats)):.3f} |")


if __name__ == "__main__":
    main()
