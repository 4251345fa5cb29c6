"""A real Prometheus scrapes a real run: the stored series equal the JSON log, and promtool is happy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).parent.parent / "configs" / "default.yaml"


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (apt-get install prometheus); .ci/run installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A Prometheus on loopback scraping a target port every second; yields (its URL, the target port)."""
    binary = _need("prometheus")
    target, web = _free_port(), _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: traintel\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target}']\n"
    )
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{web}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _get(f"{url}/-/ready")
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "prometheus did not start"
                time.sleep(0.2)
        yield url, target
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _query(url: str, promql: str) -> list[dict[str, Any]]:
    body = json.loads(_get(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"))
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_prometheus_stores_the_values_of_the_json_log(prometheus: tuple[str, int], tmp_path: Path) -> None:
    url, port = prometheus
    promtool = _need("promtool")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    run = subprocess.Popen(
        [sys.executable, "-m", "traintel", "train", "--config", str(CONFIG), "--set", f"run.dir={tmp_path / 'run'}",
         "--set", "trainer.max_epochs=3", "--set", f"sinks.prometheus.port={port}",
         "--set", "sinks.prometheus.linger_seconds=120"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert run.stdout is not None
    records = []
    for line in run.stdout:
        records.append(json.loads(line))
        if records[-1]["event"] == "run.end":
            break
    end = records[-1]
    try:
        exposition = _get(f"http://127.0.0.1:{port}/metrics")
        check = subprocess.run(
            [promtool, "check", "metrics"], input=exposition, capture_output=True, check=False
        )
        assert (check.returncode, check.stdout, check.stderr) == (0, b"", b"")

        deadline = time.monotonic() + 30  # wait for a scrape taken after the run ended
        while [float(r["value"][1]) for r in _query(url, "traintel_optimizer_step")] != [end["step"]]:
            assert time.monotonic() < deadline, "prometheus never scraped the final step"
            time.sleep(0.5)

        def last(event: str) -> dict[str, Any]:
            return [r for r in records if r["event"] == event][-1]

        expected = {
            "traintel_optimizer_step": end["step"],
            "traintel_epoch": end["epoch"],
            "traintel_items_total": end["items_total"],
            "traintel_step_loss": last("train.step")["loss"],
            "traintel_learning_rate": last("train.step")["lr"],
            "traintel_batch_loss": last("train.batch")["loss"],
            "traintel_batch_raw_loss": last("train.batch")["raw_loss"],
            "traintel_epoch_loss": last("train.epoch")["loss"],
            "traintel_eval_loss": last("eval.epoch")["loss"],
        }
        for metric, value in expected.items():
            (sample,) = _query(url, metric)
            assert sample["metric"] == {
                "__name__": metric,
                "instance": f"127.0.0.1:{port}",
                "job": "traintel",
            }
            assert float(sample["value"][1]) == value, metric
        (info,) = _query(url, "traintel_run_info")
        assert info["metric"]["run_id"] == end["run_id"]
    finally:
        run.send_signal(signal.SIGTERM)  # ends the linger at once
        assert run.wait(timeout=15) == 0
