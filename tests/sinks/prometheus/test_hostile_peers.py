"""Hostile peers cannot hurt the run: idle clients, a silent TLS client, a dripping Pushgateway, a
plug-in sink whose ``close()`` hangs.

Black-box: each test runs ``python -m traintel train`` as a real subprocess on the built-in task,
talks to its exporter over real sockets on 127.0.0.1 and stops it with real signals. Each test
checks every property it states and reports all that do not hold at once, so one run of a test
says everything that is wrong, not only the first thing.

The children run with ``OMP_NUM_THREADS=1`` (as the other subprocess tests do): on this 2-core
machine a second intra-op thread that competes with another process for a core makes a step up
to 30x slower, and the step rate is part of what is measured here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import select
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.lines import strict_object
from tests.helpers.paths import ROOT
from tests.helpers.servers import self_signed_cert, wait_until

pytestmark = pytest.mark.slow

CONFIG = ROOT / "configs" / "default.yaml"

SIGNAL_DEADLINE = 10.0
"""Seconds from SIGTERM to the process's exit: ``docker stop``'s grace period
(docs/concepts/lifecycle.md: "well inside 10 s")."""
SCRAPE_DEADLINE = 3.0
"""Seconds a scrape may take while the exporter is being abused."""


# -- the child ---------------------------------------------------------------------------------


class Child:
    """``python -m traintel train`` on the built-in task, stdout read by a thread, every line parsed
    strictly (``traintel.schema.parse_line``) as it arrives, with the time it arrived."""

    def __init__(
        self,
        tmp_path: Path,
        *overrides: str,
        nofile: int | None = None,
        pythonpath: Path | None = None,
    ) -> None:
        self.run_dir = tmp_path / "run"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
        env["OMP_NUM_THREADS"] = "1"
        if pythonpath is not None:  # after any inherited entries, so they keep precedence
            env["PYTHONPATH"] = os.pathsep.join([*filter(None, [env.get("PYTHONPATH")]), str(pythonpath)])
        argv = [
            sys.executable, "-m", "traintel", "train", "--config", str(CONFIG),
            "--set", f"run.dir={self.run_dir}", "--set", "sinks.prometheus.port=0",
            "--set", "sinks.json.format=json", *[a for o in overrides for a in ("--set", o)],
        ]  # fmt: skip
        limit = None if nofile is None else _limit_descriptors(nofile)
        self.proc = subprocess.Popen(
            argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=limit,  # noqa: PLW1509 (between fork and exec it makes one system call, setrlimit)
        )  # fmt: skip
        self.records: list[dict[str, Any]] = []
        self.bad_lines: list[bytes] = []
        self.stderr = b""
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                record = strict_object(line)
            except Exception:
                with self._cond:
                    self.bad_lines.append(line)
                continue
            with self._cond:
                self.records.append(record)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        """The first record (already read or yet to come) for which ``predicate`` holds; None if
        none came within ``timeout`` seconds or stdout ended."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for record in self.records[seen:]:
                    if predicate(record):
                        return record
                seen = len(self.records)
                left = deadline - time.monotonic()
                if left <= 0 or not self._threads[0].is_alive():
                    return None
                self._cond.wait(min(left, 0.1))

    def started(self) -> dict[str, Any]:
        start = self.wait_for(lambda r: r["event"] == "run.start", 120)
        assert start is not None, f"no run.start; stderr: {self.stderr!r}"
        return start

    def step_reached(self, step: int, timeout: float = 60) -> None:
        record = self.wait_for(lambda r: r["event"] == "train.step" and r["step"] >= step, timeout)
        assert record is not None, f"training never reached step {step}; stderr: {self.stderr!r}"

    def steps(self) -> list[tuple[float, int]]:
        """(Unix time the step ended, step number) of every ``train.step`` read so far."""
        with self._cond:
            return [(_unix(r["timestamp"]), r["step"]) for r in self.records if r["event"] == "train.step"]

    def step_rate(self, t0: float, t1: float) -> float | None:
        """Optimizer steps per second between Unix times ``t0`` and ``t1`` (from the records' own
        timestamps, so the delay of stdout does not matter); waits up to 2 s for a record past
        ``t1``. None when no step had ended by ``t0``."""
        self.wait_for(lambda r: r["event"] == "train.step" and _unix(r["timestamp"]) >= t1, 2.0)
        steps = self.steps()
        before = [s for ts, s in steps if ts <= t0]
        upto = [s for ts, s in steps if ts <= t1]
        if not before:
            return None
        return (upto[-1] - before[-1]) / (t1 - t0)

    def signal(self, sig: int) -> float:
        """Send ``sig``; returns the monotonic time it was sent."""
        sent = time.monotonic()
        self.proc.send_signal(sig)
        return sent

    def exit_by(self, deadline: float) -> int | None:
        """The exit status if the process ended before the monotonic time ``deadline``, else None."""
        try:
            return self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None

    def finish(self) -> None:
        """Kill the process if it is still running, and read what is left of its output."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for t in self._threads:
            t.join(timeout=10)

    def events(self, name: str) -> list[dict[str, Any]]:
        with self._cond:
            return [r for r in self.records if r["event"] == name]

    def diagnostic_lines(self) -> list[dict[str, Any]]:
        path = self.run_dir / "diagnostic.jsonl"
        if not path.exists():
            return []
        lines = []
        for line in path.read_bytes().splitlines():
            with contextlib.suppress(Exception):  # a line cut short by the kill is not a record
                lines.append(strict_object(line))
        return lines


def _limit_descriptors(n: int) -> Callable[[], None]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return limit


def _unix(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


@contextlib.contextmanager
def child(tmp_path: Path, *overrides: str, **kwargs: Any) -> Iterator[Child]:
    c = Child(tmp_path, *overrides, **kwargs)
    try:
        yield c
    finally:
        c.finish()


@dataclass
class Findings:
    """Every property a test checks; the test fails once, at the end, listing all that did not hold."""

    problems: list[str] = field(default_factory=list)

    def expect(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok

    def verdict(self, c: Child) -> None:
        if c.bad_lines:
            self.problems.append(f"stdout lines that are not strict JSON objects: {c.bad_lines[:3]!r}")
        tail = c.stderr.decode(errors="replace")[-2000:]
        if self.problems:
            pytest.fail("\n".join(["", *(f"- {p}" for p in self.problems), f"stderr: {tail!r}"]))


def _exit_problem(code: int | None, expected: int, seconds: float, what: str) -> str:
    if code is None:
        return f"still running {seconds:g} s after {what} (killed by the test)"
    return f"exit status {code} after {what}, expected {expected}"


def _last_line(c: Child, status: str) -> tuple[bool, str]:
    """Whether the diagnostic file ends with run.end with ``status``, followed at most by the
    Pushgateway push's ``sink.error`` (the push comes after run.end is safe), and what it ends with."""
    diag = c.diagnostic_lines()
    if not diag:
        return False, f"{c.run_dir / 'diagnostic.jsonl'} is missing or holds no record"
    while diag[-1]["event"] == "sink.error" and diag[-1]["sink"] == "prometheus":
        diag.pop()
    last = diag[-1]
    ok = (last["event"], last.get("status")) == ("run.end", status)
    return (
        ok,
        f"the diagnostic file's last line is {last['event']} ({last.get('status')}), expected run.end ({status})",
    )


def _run_end(records: list[dict[str, Any]]) -> str:
    ends = [(r["status"], r["reason"]) for r in records if r["event"] == "run.end"]
    return f"run.end records: {ends}"


def _scrape(url: str, context: ssl.SSLContext | None = None) -> tuple[float, str | None, str]:
    """(seconds taken, body or None, what went wrong) of one scrape with a 3 s timeout."""
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_DEADLINE, context=context) as resp:
            status = resp.status
            body = resp.read().decode()
    except Exception as exc:
        return time.monotonic() - t0, None, f"{type(exc).__name__}: {exc}"
    if status != 200:
        return time.monotonic() - t0, None, f"status {status}"
    return time.monotonic() - t0, body, ""


def _sample(body: str, name: str, labels: dict[str, str]) -> float | None:
    """The value of the sample ``name`` with exactly ``labels`` in an exposition; None if absent."""
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def _wait_for_sample(
    url: str,
    name: str,
    labels: dict[str, str],
    holds: Callable[[float], bool],
    *,
    never: str,
    timeout: float = 30.0,
    context: ssl.SSLContext | None = None,
) -> None:
    """Scrape ``url`` until the sample ``name{labels}`` has a value ``holds`` accepts (a cached
    exposition may lag behind); fail with ``never`` and what the last scrape said after ``timeout``
    seconds."""
    last = ["no scrape was answered"]

    def scraped() -> bool:
        _, body, error = _scrape(url, context)
        if body is None:
            last[0] = f"the last scrape failed: {error}"
            return False
        value = _sample(body, name, labels)
        last[0] = f"the last scrape had {name}{labels or ''} = {value}"
        return value is not None and holds(value)

    wait_until(scraped, lambda: f"{never}; {last[0]}", timeout)


def _host_port(url: str) -> tuple[str, int]:
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = netloc.rpartition(":")
    return host, int(port)


# -- 1. idle connections -----------------------------------------------------------------------

IDLE_CONNECTIONS = 300
CHILD_DESCRIPTORS = 256


def _idle_flood(host: str, port: int, n: int) -> list[socket.socket]:
    """``n`` TCP connections that never send a byte, kept open.

    One at a time, each given up to 50 ms to complete its handshake before the next is started,
    as a client that keeps its connections would open them: a burst overflows the listen backlog,
    and then most of it never reaches the exporter (with SYN cookies the client even sees those
    connections established while the server holds nothing of them). A connection that does not
    complete in time is kept all the same (its SYN is retried by the kernel).
    """
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        code = s.connect_ex((host, port))
        assert code in (0, errno.EINPROGRESS), os.strerror(code)
        socks.append(s)
        select.select([], [s], [], 0.05)
    return socks


@pytest.fixture
def descriptors() -> Iterator[None]:
    """Room in this process for the flood's sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = IDLE_CONNECTIONS + 200
    if soft >= want:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {want}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_connections_cannot_exhaust_the_process(tmp_path: Path, descriptors: None) -> None:
    """300 idle connections to an exporter whose process may hold 256 descriptors: scrapes are
    still answered, training keeps at least half its pace, the diagnostic file rotates through it,
    and a SIGTERM after it stops the run cleanly (the rest of its 10,000 steps would prove nothing
    more)."""
    found = Findings()
    # 100 steps per epoch (9,600 samples in micro-batches of 32, k=3), 10,000 steps in all: 15-60 s
    # here (~150-600 steps/s); the measurements below take 3-16 s of it. ~4 records per 10
    # steps at ~600 bytes each in the diagnostic file: 32 KiB parts rotate every 0.3-1 s.
    with child(
        tmp_path,
        "task.params.train_samples=9600", "task.params.val_samples=0", "trainer.max_epochs=100",
        "telemetry.every=10", "sinks.diagnostic.max_bytes=32768", "sinks.diagnostic.backups=3",
        nofile=CHILD_DESCRIPTORS,
    ) as c:  # fmt: skip
        start = c.started()
        url = start["metrics_url"]
        c.step_reached(100)
        base_t0 = time.time()
        time.sleep(2.0)
        base_t1 = time.time()
        flood = _idle_flood(*_host_port(url), IDLE_CONNECTIONS)
        try:
            # the flood has reached the exporter: its connections fill every slot, so a newer one
            # (the flood's or a scrape's) has closed the longest idle one at least once
            _wait_for_sample(
                url, "traintel_exporter_connections_closed_total", {"reason": "limit"}, lambda n: n >= 1,
                never="the flood never filled the exporter's connections (none closed for the limit)",
            )  # fmt: skip
            flood_t0 = time.time()
            seconds, body, error = _scrape(url)
            found.expect(
                body is not None and seconds <= SCRAPE_DEADLINE,
                f"a scrape during the flood: {error or f'took {seconds:.2f} s'}",
            )
            found.expect(
                body is None or "\ntraintel_optimizer_step " in f"\n{body}",
                "the scrape during the flood has no traintel_optimizer_step sample",
            )
            time.sleep(max(0.0, flood_t0 + 3.0 - time.time()))
            flood_t1 = time.time()
            alive_during_flood = c.proc.poll() is None
        finally:
            for s in flood:
                s.close()
        base = c.step_rate(base_t0, base_t1)
        during = c.step_rate(flood_t0, flood_t1)
        assert base is not None and base > 0, f"no steps measured before the flood: {c.steps()[-5:]}"
        assert alive_during_flood and c.steps()[-1][0] > flood_t1, (
            "the run ended before the flood window did: raise trainer.max_epochs "
            f"(baseline {base:.0f} steps/s), or the process died; stderr: {c.stderr[-2000:]!r}"
        )
        found.expect(
            during is not None and during >= 0.5 * base,
            f"training slowed to {during or 0:.0f} steps/s during the flood from {base:.0f} steps/s "
            f"before it ({(during or 0) / base:.0%}, at least 50% expected)",
        )
        c.proc.send_signal(signal.SIGTERM)
        code = c.exit_by(time.monotonic() + 180)
        found.expect(code == 143, _exit_problem(code, 143, 180, "SIGTERM, once the flood ended"))
        c.finish()
        ends = c.events("run.end")
        found.expect(
            [(e["status"], e["reason"]) for e in ends] == [("terminated", "SIGTERM")], _run_end(c.records)
        )
        found.expect(*_last_line(c, "terminated"))
        found.expect(
            (c.run_dir / "diagnostic.jsonl.1").exists(), "the diagnostic file never rotated (no .1 part)"
        )
        # The flood must not take the descriptors the rest of the process needs (rotation opens
        # the next part): no sink reports a failure.
        errors = [(r["sink"], r["error"]) for r in c.events("sink.error")]
        found.expect(not errors, f"sink errors during the run: {errors}")
        found.verdict(c)


# -- 2. a silent TLS client --------------------------------------------------------------------


@pytest.fixture
def server_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    return self_signed_cert(tmp_path)


def test_an_idle_tls_connection_blocks_no_scrape(tmp_path: Path, server_cert: tuple[Path, Path]) -> None:
    """A client that connects and never starts its TLS handshake delays no other scrape and not
    the shutdown. The exporter gives a connection 60 s here (``request_timeout_seconds``), so the
    silent client is still connected when the scrape and SIGTERM come, however slow the machine."""
    cert, key = server_cert
    found = Findings()
    with child(
        tmp_path, "trainer.max_epochs=100000", f"sinks.prometheus.certfile={cert}",
        f"sinks.prometheus.keyfile={key}", "sinks.prometheus.request_timeout_seconds=60",
    ) as c:  # fmt: skip
        url = c.started()["metrics_url"]
        assert url.startswith("https://"), url
        c.step_reached(3)
        trusting = ssl.create_default_context(cafile=str(cert))
        with socket.create_connection(_host_port(url), timeout=5):  # sends nothing, stays open
            # the exporter has taken it: two open connections, the silent one and the scrape's own
            _wait_for_sample(
                url, "traintel_exporter_open_connections", {}, lambda n: n == 2,
                never="the exporter never counted the silent connection", context=trusting,
            )  # fmt: skip
            seconds, body, error = _scrape(url, trusting)
            found.expect(
                body is not None and seconds <= SCRAPE_DEADLINE,
                f"a TLS scrape while another client idles: {error or f'took {seconds:.2f} s'}",
            )
            found.expect(
                body is None or "\ntraintel_optimizer_step " in f"\n{body}",
                "the TLS scrape has no traintel_optimizer_step sample",
            )
            sent = c.signal(signal.SIGTERM)
            code = c.exit_by(sent + SIGNAL_DEADLINE)
        found.expect(code == 143, _exit_problem(code, 143, SIGNAL_DEADLINE, "SIGTERM"))
        c.finish()
        ends = [(e["status"], e["reason"]) for e in c.events("run.end")]
        found.expect(ends == [("terminated", "SIGTERM")], _run_end(c.records))
        found.verdict(c)


# -- 3. a dripping Pushgateway -----------------------------------------------------------------

DRIP_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
DRIP_INTERVAL = 2.0
"""Seconds between the bytes of the stand-in's response: under any per-read socket timeout of a few
seconds, and a whole response takes over a minute."""


class DrippingGateway:
    """A Pushgateway stand-in: takes a request whole, then answers one byte every 2 s."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[str] = []
        self.received = threading.Event()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next(
                    (int(h.split(":", 1)[1]) for h in lines[1:] if h.lower().startswith("content-length:")), 0
                )
                while len(body) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    body += chunk
                self.requests.append(lines[0])
                self.received.set()
                for i in range(len(DRIP_RESPONSE)):
                    if self._stop.wait(DRIP_INTERVAL):
                        return
                    conn.sendall(DRIP_RESPONSE[i : i + 1])

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for t in self._threads:
            t.join(timeout=5)


@pytest.fixture
def dripping_gateway() -> Iterator[DrippingGateway]:
    gateway = DrippingGateway()
    try:
        yield gateway
    finally:
        gateway.close()


def _pushes(gateway: DrippingGateway) -> list[str]:
    return [r for r in gateway.requests if r.split(" ")[0] in ("PUT", "POST") and " /metrics/job/" in r]


@pytest.mark.parametrize("second_sigterm", [False, True], ids=["one-sigterm", "second-sigterm"])
def test_a_dripping_pushgateway_cannot_hold_the_shutdown(
    tmp_path: Path, dripping_gateway: DrippingGateway, second_sigterm: bool
) -> None:
    """The push has a wall-clock limit (``pushgateway.timeout_seconds``, 5 s by default) however
    slowly the gateway answers, so SIGTERM ends the run well inside 10 s; a second SIGTERM while
    the push waits exits at once."""
    found = Findings()
    with child(
        tmp_path, "trainer.max_epochs=100000", f"sinks.prometheus.pushgateway.url={dripping_gateway.url}"
    ) as c:
        c.started()
        c.step_reached(3)
        sent = c.signal(signal.SIGTERM)
        if not second_sigterm:
            code = c.exit_by(sent + SIGNAL_DEADLINE)
            found.expect(code == 143, _exit_problem(code, 143, SIGNAL_DEADLINE, "SIGTERM"))
        else:
            pushed = dripping_gateway.received.wait(SIGNAL_DEADLINE)
            assert pushed, f"no push reached the gateway within {SIGNAL_DEADLINE:g} s of SIGTERM"
            sent = c.signal(signal.SIGTERM)
            code = c.exit_by(sent + 1.5)
            found.expect(code == 143, _exit_problem(code, 143, 1.5, "the second SIGTERM"))
        c.finish()
        found.expect(
            len(_pushes(dripping_gateway)) == 1,
            f"the gateway received {dripping_gateway.requests}, expected one PUT/POST to /metrics/job/...",
        )
        ends = [(e["status"], e["reason"]) for e in c.events("run.end")]
        found.expect(ends == [("terminated", "SIGTERM")], _run_end(c.records))
        found.expect(*_last_line(c, "terminated"))
        errors = [(r["sink"], r["error"]) for r in c.events("sink.error")]
        why = "abandoned: the process was asked to stop" if second_sigterm else "failed: no answer within 5 s"
        expected = [("prometheus", f"OSError: push to {dripping_gateway.url} {why}")]
        found.expect(errors == expected, f"sink errors {errors}, expected {expected}")
        found.expect(
            c.records[-1]["event"] == "sink.error", "the push's sink.error is not stdout's last line"
        )
        found.verdict(c)


# -- 4. a plug-in sink whose close() hangs ------------------------------------------------------

HANGING_SINK = textwrap.dedent(
    """
    import time


    class HangingSink:
        name = "sleepy_plugin"

        def open(self, context):
            pass

        def emit(self, record):
            pass

        def close(self):
            time.sleep(60)


    def make():
        return HangingSink()
    """
)


def test_a_plugin_close_that_hangs_is_abandoned(tmp_path: Path) -> None:
    """A plug-in sink's ``close()`` that never returns is abandoned and reported; the run still ends
    inside 10 s of SIGTERM with its run.end on stdout and in the diagnostic file."""
    (tmp_path / "hanging_sink.py").write_text(HANGING_SINK)
    found = Findings()
    with child(
        tmp_path, "trainer.max_epochs=100000", "sinks.extra=[{factory: 'hanging_sink:make'}]",
        pythonpath=tmp_path,
    ) as c:  # fmt: skip
        c.started()
        c.step_reached(3)
        sent = c.signal(signal.SIGTERM)
        code = c.exit_by(sent + SIGNAL_DEADLINE)
        found.expect(code == 143, _exit_problem(code, 143, SIGNAL_DEADLINE, "SIGTERM"))
        c.finish()
        said = [
            r for r in c.records
            if r["event"] != "run.start" and "sleepy_plugin" in (text := json.dumps(r)) and "close" in text
        ]  # fmt: skip
        found.expect(
            bool(said),
            "no JSON line on stdout names the sink 'sleepy_plugin' and says its close was abandoned; "
            f"the last lines: {[r['event'] for r in c.records[-5:]]}",
        )
        ends = [(e["status"], e["reason"]) for e in c.events("run.end")]
        found.expect(ends == [("terminated", "SIGTERM")], f"stdout: {_run_end(c.records)}")
        diag = c.diagnostic_lines()
        diag_ends = [(r["status"], r["reason"]) for r in diag if r["event"] == "run.end"]
        found.expect(diag_ends == [("terminated", "SIGTERM")], f"diagnostic file: {_run_end(diag)}")
        found.verdict(c)
