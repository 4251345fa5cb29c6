"""traintel's threads block the stop signals, so that the kernel gives those to the main thread."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from traintel import threads
from traintel.sinks import DiagnosticSink, FanOut, JsonSink, PrometheusSink
from traintel.testing import run_context, step_record

STOP = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _blocked(native_id: int) -> set[int]:
    """The signals thread ``native_id`` of this process blocks, from /proc."""
    status = Path(f"/proc/self/task/{native_id}/status").read_text()
    mask = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
    return {n for n in range(1, signal.NSIG) if mask >> (n - 1) & 1}


def test_a_thread_started_by_start_blocks_the_stop_signals_and_the_caller_keeps_its_mask() -> None:
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    seen: list[set[int]] = []
    thread = threading.Thread(target=lambda: seen.append(set(signal.pthread_sigmask(signal.SIG_BLOCK, []))))

    threads.start(thread)
    thread.join()

    assert seen == [STOP | set(before)]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_every_thread_of_the_sinks_blocks_the_stop_signals(tmp_path: Path) -> None:
    with open(os.devnull, "wb") as devnull:
        prometheus = PrometheusSink(port=0)
        fan = FanOut([prometheus, JsonSink(devnull), DiagnosticSink()])
        ours = {t.native_id for t in threading.enumerate()}
        fan.open(run_context(tmp_path / "run", name="threads"))
        try:
            fan.emit(step_record())
            started = {t.name: t.native_id for t in threading.enumerate() if t.native_id not in ours}
            blocking = {name: _blocked(tid) >= STOP for name, tid in started.items() if tid is not None}
        finally:
            fan.close()
    assert sorted(started) == ["traintel-diagnostic-writer", "traintel-json-writer", "traintel-metrics"]
    assert blocking == dict.fromkeys(started, True)
