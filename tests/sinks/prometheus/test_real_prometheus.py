"""A real Prometheus scrapes a real run: the stored series equal the JSON log, and promtool is happy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.children import popen
from tests.helpers.paths import ROOT
from tests.helpers.servers import free_port, http_get, need_tool, prometheus_server, wait_until

pytestmark = pytest.mark.slow

CONFIG = ROOT / "configs" / "default.yaml"


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A Prometheus on loopback scraping a target port every second; yields (its URL, the target port)."""
    target = free_port()
    with prometheus_server(tmp_path, target) as url:
        yield url, target


def _query(url: str, promql: str) -> list[dict[str, Any]]:
    body = json.loads(http_get(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"))
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_prometheus_stores_the_values_of_the_json_log(prometheus: tuple[str, int], tmp_path: Path) -> None:
    url, port = prometheus
    promtool = need_tool("promtool")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    run = popen(
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
        exposition = http_get(f"http://127.0.0.1:{port}/metrics")
        check = subprocess.run(
            [promtool, "check", "metrics"], input=exposition, capture_output=True, check=False
        )
        assert (check.returncode, check.stdout, check.stderr) == (0, b"", b"")

        # a scrape taken after the run ended: run.end alone sets traintel_run_success (a scrape with
        # the final step may come before the last epoch's end and evaluation)
        wait_until(
            lambda: [float(r["value"][1]) for r in _query(url, "traintel_run_success")] == [1.0],
            "prometheus never scraped the run's end (traintel_run_success 1)", 30, interval=0.5,
        )  # fmt: skip

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
            split = {"split": "val"} if metric == "traintel_eval_loss" else {}
            assert sample["metric"] == {
                "__name__": metric,
                "instance": f"127.0.0.1:{port}",
                "job": "traintel",
                **split,
            }
            assert float(sample["value"][1]) == value, metric
        (info,) = _query(url, "traintel_run_info")
        assert info["metric"]["run_id"] == end["run_id"]
    finally:
        run.send_signal(signal.SIGTERM)  # ends the linger at once
        assert run.wait(timeout=15) == 0
