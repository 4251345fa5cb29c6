"""The exporter's own HTTP server against awkward and hostile clients, over real sockets."""

from __future__ import annotations

import gzip
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from tests.helpers.servers import self_signed_cert
from traintel.sinks.prometheus.server import MetricsServer, server_context
from traintel.sinks.prometheus.sink import PrometheusSink
from traintel.testing import run_context


class _Counting:
    """One gauge whose value is the number of times it was collected."""

    def __init__(self) -> None:
        self.collections = 0

    def collect(self) -> Iterator[Metric]:
        self.collections += 1
        yield GaugeMetricFamily("demo_value", "A test value.", value=42.0)


@pytest.fixture
def served() -> Iterator[tuple[MetricsServer, _Counting]]:
    registry = CollectorRegistry(auto_describe=False)
    counting = _Counting()
    registry.register(counting)
    server = MetricsServer(registry, "127.0.0.1", 0, max_connections=4, timeout=1.0)
    try:
        yield server, counting
    finally:
        server.stop()


def _request(port: int, raw: bytes, sock: socket.socket | None = None) -> bytes:
    """Send ``raw`` and read until the server closes the connection."""
    with sock or socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(raw)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _get(port: int, path: str = "/metrics", headers: str = "") -> tuple[str, dict[str, str], bytes]:
    raw = _request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


TEXT = b"# HELP demo_value A test value.\n# TYPE demo_value gauge\ndemo_value 42.0\n"


def test_a_scrape_gets_the_text_format_with_exact_headers(served: tuple[MetricsServer, _Counting]) -> None:
    server, _ = served
    assert _get(server.port) == (
        "HTTP/1.1 200 OK",
        {
            "Content-Type": "text/plain; version=0.0.4; charset=utf-8",
            "Vary": "Accept, Accept-Encoding",
            "Content-Length": str(len(TEXT)),
            "Connection": "close",
        },
        TEXT,
    )


def test_openmetrics_and_gzip_are_negotiated(served: tuple[MetricsServer, _Counting]) -> None:
    server, _ = served
    status, headers, body = _get(
        server.port, headers="Accept: application/openmetrics-text;version=1.0.0\r\nAccept-Encoding: gzip\r\n"
    )
    assert status == "HTTP/1.1 200 OK"
    assert headers["Content-Type"] == (
        "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"
    )
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == (
        b"# HELP demo_value A test value.\n# TYPE demo_value gauge\ndemo_value 42.0\n# EOF\n"
    )


def test_the_exposition_is_rendered_once_per_change(served: tuple[MetricsServer, _Counting]) -> None:
    server, counting = served
    for _ in range(5):
        assert _get(server.port)[2] == TEXT
        assert _get(server.port, headers="Accept-Encoding: gzip\r\n")[1]["Content-Encoding"] == "gzip"
    assert (server.renders, counting.collections) == (1, 1)
    server.changed()
    for _ in range(3):
        _get(server.port)
    _get(server.port, headers="Accept: application/openmetrics-text;version=1.0.0\r\n")
    assert (server.renders, counting.collections) == (3, 3)  # once more for text, once for OpenMetrics


def test_a_cached_exposition_is_rendered_again_after_max_age(served: tuple[MetricsServer, _Counting]) -> None:
    server, counting = served
    server.max_age = 0.2
    _get(server.port)
    time.sleep(0.3)
    _get(server.port)
    assert counting.collections == 2


def test_other_methods_paths_and_garbage_get_exact_errors(served: tuple[MetricsServer, _Counting]) -> None:
    server, _ = served
    post = _request(server.port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert post.split(b"\r\n")[0] == b"HTTP/1.1 405 Method Not Allowed"
    assert b"Allow: GET, HEAD\r\n" in post
    assert _get(server.port, "/other")[0] == "HTTP/1.1 404 Not Found"
    assert _request(server.port, b"hello\r\n\r\n").split(b"\r\n")[0] == b"HTTP/1.1 400 Bad Request"
    huge = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 20_000
    assert _request(server.port, huge).split(b"\r\n")[0] == b"HTTP/1.1 431 Request Header Fields Too Large"
    head = _request(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert head.endswith(f"Content-Length: {len(TEXT)}\r\nConnection: close\r\n\r\n".encode())
    assert server.closed_early == {"limit": 0, "timeout": 0, "bad_request": 2, "tls": 0}


def test_a_connection_beyond_the_limit_closes_the_longest_idle_one(
    served: tuple[MetricsServer, _Counting],
) -> None:
    server, _ = served
    server.timeout = 30.0
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(4)]
    try:
        _wait_for(lambda: server.open_connections == 4)
        assert _get(server.port)[2] == TEXT  # the fifth connection is served
        assert idle[0].recv(1) == b""  # the longest idle one was closed for it
        assert server.closed_early["limit"] == 1
        idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        _wait_for(lambda: server.open_connections == 4)
        assert _get(server.port)[2] == TEXT
        assert idle[1].recv(1) == b""
        assert server.closed_early["limit"] == 2
        assert server.open_connections == 3
    finally:
        for s in idle:
            s.close()


def test_an_idle_connection_is_closed_after_the_timeout(served: tuple[MetricsServer, _Counting]) -> None:
    server, _ = served
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as idle:
        idle.sendall(b"GET /metr")  # half a request, then nothing
        started = time.monotonic()
        assert idle.recv(1) == b""
        assert 0.8 < time.monotonic() - started < 3.0
    assert server.closed_early["timeout"] == 1


def test_the_server_health_is_exported_and_promtool_clean(tmp_path: Path) -> None:
    sink = PrometheusSink(port=0, max_connections=1)
    sink.open(run_context(tmp_path))
    try:
        assert sink.server is not None
        port = sink.server.port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
            _wait_for(lambda: sink.server is not None and sink.server.open_connections == 1)
            body = _get(port)[2]
            assert idle.recv(1) == b""
        lines = body.decode().splitlines()
        assert 'traintel_exporter_connections_closed_total{reason="limit"} 1.0' in lines
        assert 'traintel_exporter_connections_closed_total{reason="timeout"} 0.0' in lines
        assert "traintel_exporter_open_connections 1.0" in lines
        promtool = shutil.which("promtool")
        if promtool is not None:
            check = subprocess.run(
                [promtool, "check", "metrics"], input=body, capture_output=True, check=False
            )
            assert (check.returncode, check.stdout, check.stderr) == (0, b"", b"")
    finally:
        sink.close()


def test_a_silent_tls_client_blocks_no_scrape(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Counting())
    server = MetricsServer(
        registry, "127.0.0.1", 0, tls=server_context(str(cert), str(key), None), timeout=1.0
    )
    try:
        client = ssl.create_default_context(cafile=str(cert))
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as silent:
            _wait_for(lambda: server.open_connections == 1)
            started = time.monotonic()
            with (
                socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
                client.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
            ):
                reply = _request(server.port, b"GET /metrics HTTP/1.1\r\n\r\n", tls)
            assert time.monotonic() - started < 0.5
            assert reply.endswith(b"\r\n\r\n" + TEXT)
            assert silent.recv(1) == b""  # its handshake timed out
        assert server.closed_early == {"limit": 0, "timeout": 1, "bad_request": 0, "tls": 0}
    finally:
        server.stop()


_SCRAPER = """
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /metrics HTTP/1.1\\r\\n\\r\\n")
        while s.recv(65536):
            pass
    n += 1
print(n)
"""


def test_scrapers_in_a_tight_loop_get_a_small_share_of_a_cpu(served: tuple[MetricsServer, _Counting]) -> None:
    server, _ = served
    thread = next(t for t in threading.enumerate() if t.name == "traintel-metrics")
    assert thread.ident is not None
    clock = time.pthread_getcpuclockid(thread.ident)
    cpu, wall = time.clock_gettime(clock), time.monotonic()
    scrapers = [
        subprocess.Popen(
            [sys.executable, "-c", _SCRAPER, str(server.port), "3"], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    served_count = sum(int(p.communicate(timeout=30)[0]) for p in scrapers)
    cpu, wall = time.clock_gettime(clock) - cpu, time.monotonic() - wall
    assert served_count > 50  # they were served, not refused
    assert cpu < server.cpu_share * wall * 1.5 + 0.02, (cpu, wall, served_count)


def _wait_for(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not callable(condition) or not condition():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)
