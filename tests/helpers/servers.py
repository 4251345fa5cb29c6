"""Helpers shared by the tests that run real servers (Prometheus, the Pushgateway) on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest


def need_tool(tool: str, package: str = "prometheus") -> str:
    """The tool's path; skip when it is missing, but fail under CI, whose .ci/run installs it."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (apt-get install {package}); .ci/run installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], never: str | Callable[[], str], timeout: float = 60.0, interval: float = 0.05
) -> T:
    """Poll ``condition`` every ``interval`` seconds until it returns a true value, and return that
    value; after ``timeout`` seconds fail with ``never`` (what never happened; a callable is asked
    then, so it can say what was seen last). A test waits for what it needs, never for a time."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"{never if isinstance(never, str) else never()} (waited {timeout:g} s)")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read()


def wait_ready(url: str, proc: subprocess.Popen[Any], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            http_get(url)
            return
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, f"{what} did not start"
            time.sleep(0.1)


@contextmanager
def prometheus_server(tmp_path: Path, *targets: int, rule_files: Sequence[Path] = ()) -> Iterator[str]:
    """A Prometheus on loopback scraping 127.0.0.1:``port`` for each of ``targets`` every second
    (job ``traintel``), evaluating ``rule_files`` every second; yields its URL."""
    binary = need_tool("prometheus")
    web = free_port()
    config = tmp_path / "prometheus.yml"
    rules = "".join(f"  - {json.dumps(str(p))}\n" for p in rule_files)
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        + (f"rule_files:\n{rules}" if rules else "")
        + "scrape_configs:\n  - job_name: traintel\n    static_configs:\n"
        f"      - targets: {json.dumps([f'127.0.0.1:{port}' for port in targets])}\n"
    )
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{web}"
    try:
        wait_ready(f"{url}/-/ready", proc, "prometheus")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def pushgateway_server() -> Iterator[str]:
    """A Pushgateway on loopback without persistence; yields its URL."""
    binary = need_tool("prometheus-pushgateway", package="prometheus-pushgateway")
    port = free_port()
    gateway = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/-/ready", gateway, "prometheus-pushgateway")
        yield url
    finally:
        gateway.terminate()
        gateway.wait(timeout=10)


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by openssl in ``directory`` (the
    test is skipped without openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key
