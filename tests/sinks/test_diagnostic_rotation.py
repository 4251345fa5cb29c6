"""Rotation with no descriptor to spare: the current part goes on, nothing is lost, it is reported once.

Each test runs a child that lowers ``RLIMIT_NOFILE`` and opens ``/dev/null`` until EMFILE, so the
next part really cannot be opened; the child prints what only it can see (counts, the errors
raised) as JSON and the test reads the files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.children import CHILD_TIMEOUT, run_child
from tests.helpers.paths import ROOT

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is POSIX only")


EXHAUST = """\
import errno, json, os, resource, sys
from pathlib import Path

def exhaust():
    '''Lower the descriptor limit, then take every free descriptor; returns them.'''
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    taken = []
    while True:
        try:
            taken.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            assert exc.errno == errno.EMFILE, exc
            return taken

def release(taken):
    for fd in taken:
        os.close(fd)
"""

ROTATING_CHILD = (
    EXHAUST
    + """\
from traintel.sinks.diagnostic import RotatingFile

run_dir = Path(sys.argv[1])
path = run_dir / "diagnostic.jsonl"
line = lambda i: b"%07d " % i + b"x" * 91 + b"\\n"  # 100 bytes
f = RotatingFile(path, open(path, "xb"), max_bytes=1000, backups=2)
report = {"retry_bytes": f.retry_bytes}
f.write(b"".join(line(i) for i in range(15)))  # rotates once before line 10, normally

taken = exhaust()
f.write(b"".join(line(i) for i in range(15, 100)))  # one batch: fails before line 20
for i in range(100, 700):  # line by line: tried again only before line 676
    f.write(line(i))
f.flush()
release(taken)
error = f.rotation_error
report["exhausted"] = {"failures": f.rotation_failures, "errno": error and error.errno,
                       "names": sorted(p.name for p in run_dir.iterdir()), "size": f.size}

for i in range(700, 1332):  # descriptors are free, but the next try waits for its distance
    f.write(line(i))
report["waiting"] = {"failures": f.rotation_failures, "names": sorted(p.name for p in run_dir.iterdir())}
for i in range(1332, 1352):  # rotates before 1332, then before 1342 as usual
    f.write(line(i))
f.close()
report["after"] = {"failures": f.rotation_failures, "size": f.size}
print(json.dumps(report))
"""
)


def _run_child(script: str, run_dir: Path) -> dict[str, Any]:
    proc = run_child(
        [sys.executable, "-c", script, str(run_dir)],
        cwd=ROOT,
        timeout=CHILD_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def _lines(start: int, stop: int) -> bytes:
    return b"".join(b"%07d " % i + b"x" * 91 + b"\n" for i in range(start, stop))


def test_no_free_descriptor_keeps_the_current_part_and_rotation_resumes_later(tmp_path: Path) -> None:
    report = _run_child(ROTATING_CHILD, tmp_path)
    assert report["retry_bytes"] == 64 * 1024
    # Tried before line 20 (size 1000) and again before line 676 (size 66_600 >= 1000 + 65_536).
    assert report["exhausted"] == {
        "failures": 2,
        "errno": 24,  # EMFILE
        "names": ["diagnostic.jsonl", "diagnostic.jsonl.1"],  # no diagnostic.jsonl.next left behind
        "size": 69_000,
    }
    # Free descriptors alone do not retry: the next try is due at 66_600 + 65_536 = 132_136 bytes.
    assert report["waiting"] == {"failures": 2, "names": ["diagnostic.jsonl", "diagnostic.jsonl.1"]}
    assert report["after"] == {"failures": 2, "size": 1000}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "diagnostic.jsonl", "diagnostic.jsonl.1", "diagnostic.jsonl.2"
    ]  # fmt: skip
    # Lines 0-9 (the first part) fell off the end with backups=2; every later line is kept, in order.
    assert (tmp_path / "diagnostic.jsonl.2").read_bytes() == _lines(10, 1332)
    assert (tmp_path / "diagnostic.jsonl.1").read_bytes() == _lines(1332, 1342)
    assert (tmp_path / "diagnostic.jsonl").read_bytes() == _lines(1342, 1352)


SINK_CHILD = (
    EXHAUST
    + """\
from traintel.sinks import DiagnosticSink, FanOut, MemorySink
from traintel.testing import batch_record, end_record, run_context

run_dir = Path(sys.argv[1])
sink, memory = DiagnosticSink(max_bytes=2000, backups=1), MemorySink()
fanout = FanOut([sink, memory])
fanout.open(run_context(run_dir))
taken = exhaust()
fanout.emit_many([batch_record(batch=i, batches=None) for i in range(1, 21)])  # past max_bytes
assert fanout.sync(10.0)  # the writer has tried (and failed) to rotate
for i in range(21, 31):
    fanout.emit(batch_record(batch=i, batches=None))
fanout.emit(end_record())
fanout.close()
release(taken)
notices = [r.error for r in memory.of("sink.error")]
print(json.dumps({"errors": fanout.errors, "notices": notices, "dropped": sink.dropped}))
"""
)


def test_a_failed_rotation_is_reported_once_and_every_record_is_kept(tmp_path: Path) -> None:
    report = _run_child(SINK_CHILD, tmp_path)
    assert report["errors"] == {"diagnostic": 1, "memory": 0}
    [notice] = report["notices"]
    path = str(tmp_path / "diagnostic.jsonl")
    expected = (
        f"OSError: cannot start a new part of {path!r} (OSError: [Errno 24] Too many open files: "
        f"{str(tmp_path / 'diagnostic.jsonl.next')!r}); writing on in the current part"
    )
    assert notice == expected
    assert report["dropped"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diagnostic.jsonl"]
    records = [json.loads(line) for line in (tmp_path / "diagnostic.jsonl").read_bytes().splitlines()]
    assert [(r["event"], r.get("batch")) for r in records] == [
        *(("train.batch", i) for i in range(1, 31)),
        ("run.end", None),
    ]
    assert (tmp_path / "diagnostic.jsonl").stat().st_size > 2000
