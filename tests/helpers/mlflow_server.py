"""A real MLflow tracking server on loopback for the MLflow sink's tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.servers import free_port, wait_until

START_SECONDS = 180
"""How long the server may take to answer ``/health``: it imports much of MLflow and sets up its
database first (about 15 s on two cores)."""


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@contextmanager
def mlflow_server(directory: Path) -> Iterator[str]:
    """``mlflow server`` (the virtual environment's) with a SQLite store and artifacts in
    ``directory``, on a free loopback port, in a process group of its own that is ended on exit;
    yields its URL once ``GET /health`` answers. Its background job runner is off: the sink's tests
    need only the tracking API."""
    binary = Path(sys.executable).with_name("mlflow")
    if not binary.exists():
        pytest.fail(f"{binary} is missing: `make setup` installs mlflow with the dev extra")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = directory / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(binary), "server", "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
             "--default-artifact-root", str(directory / "artifacts"), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:

        def up() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
            return _healthy(url)

        wait_until(up, f"mlflow server on {url} never answered /health", timeout=START_SECONDS, interval=0.2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
