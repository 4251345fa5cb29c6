"""Batch jobs push to a real Pushgateway; the exporter serves TLS (and mutual TLS); secrets stay secret."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.helpers.children import run_child
from tests.helpers.paths import ROOT
from tests.helpers.servers import free_port, pushgateway_server
from traintel.records import RunEndRecord
from traintel.sinks import FanOut, MemorySink, PrometheusSink, Pushgateway
from traintel.testing import end_record, run_context

CONFIG = ROOT / "configs" / "default.yaml"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}


def _end() -> RunEndRecord:
    return end_record(time=1.7e9, step=3, duration_seconds=1.0)


@pytest.mark.slow
def test_final_values_are_pushed_to_a_real_pushgateway(tmp_path: Path) -> None:
    with pushgateway_server() as gateway_url:
        run = run_child(
            [sys.executable, "-m", "traintel", "train", "--config", str(CONFIG), "--set", f"run.dir={tmp_path / 'run'}",
             "--set", "trainer.max_epochs=2", "--set", "sinks.prometheus.port=0",
             "--set", f"sinks.prometheus.pushgateway.url={gateway_url}"],
            env=_env(), cwd=tmp_path, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        records = [json.loads(line) for line in run.stdout.splitlines()]
        with urllib.request.urlopen(f"{gateway_url}/metrics", timeout=5) as resp:
            pushed = resp.read().decode()
    run_id = records[0]["run_id"]
    labels = f'instance="",job="traintel",run_id="{run_id}"'
    samples = dict(line.rsplit(" ", 1) for line in pushed.splitlines() if line.startswith("traintel_"))
    step = [r for r in records if r["event"] == "train.step"][-1]
    end = records[-1]
    assert float(samples[f"traintel_step_loss{{{labels}}}"]) == step["loss"]
    assert float(samples[f"traintel_optimizer_step{{{labels}}}"]) == end["step"] == 22
    assert samples[f"traintel_run_success{{{labels}}}"] == "1"
    assert float(samples[f"traintel_run_end_timestamp_seconds{{{labels}}}"]) > 0


class _Capture(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str, str | None]]] = []
    bodies: ClassVar[list[bytes]] = []

    def do_PUT(self) -> None:
        _Capture.bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        _Capture.seen.append(("PUT", self.path, self.headers.get("Authorization")))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_pushgateway_basic_auth_grouping_key_and_sink_health(tmp_path: Path) -> None:
    _Capture.seen.clear()
    _Capture.bodies.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        pg = Pushgateway(url=f"http://127.0.0.1:{server.server_port}", job="nightly", username="ci",
                         password="s3cret")  # fmt: skip
        sink = PrometheusSink(port=0, pushgateway=pg)
        fan = FanOut([sink, MemorySink("json")])
        fan.errors["json"] = 4
        sink.register(fan.health_collector())
        sink.open(run_context(tmp_path))
        sink.emit(_end())
        sink.close()
    finally:
        server.shutdown()
        server.server_close()
    token = base64.b64encode(b"ci:s3cret").decode()
    assert _Capture.seen == [("PUT", "/metrics/job/nightly/run_id/r1", f"Basic {token}")]
    (body,) = _Capture.bodies
    pushed = [line for line in body.decode().splitlines() if line.startswith("traintel_")]
    assert pushed == [
        'traintel_run_info{name="demo",run_id="r1"} 1.0',
        "traintel_epoch 1.0",
        "traintel_optimizer_step 3.0",
        "traintel_run_success 1.0",
        "traintel_run_end_timestamp_seconds 1.7e+09",
        "traintel_items_total 12.0",
        'traintel_sink_errors_total{sink="json"} 4.0',
        'traintel_sink_errors_total{sink="prometheus"} 0.0',
    ]
    assert "s3cret" not in repr(pg)


def test_a_failed_push_is_a_sink_error_not_a_crash(tmp_path: Path) -> None:
    sink = PrometheusSink(port=0, pushgateway=Pushgateway(url=f"http://127.0.0.1:{free_port()}"))
    sink.open(run_context(tmp_path))
    sink.emit(_end())  # the run ended: the push is due, not made yet (the run makes it later)
    with pytest.raises(
        OSError,
        match=r"^push to http://127\.0\.0\.1:\d+ failed: URLError: <urlopen error \[Errno 111\] Connection refused>$",
    ):
        sink.push()
    sink.close()  # pushed once already: close does not push again


def test_secrets_never_reach_config_show_or_the_logs(tmp_path: Path) -> None:
    show = run_child(
        [sys.executable, "-m", "traintel", "config", "show", "--set", "sinks.prometheus.pushgateway.password=s3cret",
         "--set", "sinks.prometheus.pushgateway.username=ci"],
        env=_env(),
    )  # fmt: skip
    assert show.returncode == 0, show.stderr
    assert "s3cret" not in show.stdout
    assert "    password: '***'\n" in show.stdout and "    username: ci\n" in show.stdout

    import torch

    from tests.helpers.runs import quiet_config
    from tests.helpers.tasks import make_batches, make_model
    from traintel.run.api import build
    from traintel.sinks import JsonSink
    from traintel.task import Task

    cfg = quiet_config(tmp_path)
    cfg["sinks"]["prometheus"] = {
        "enabled": False,
        "pushgateway": {"url": "http://127.0.0.1:1", "password": "s3cret"},
    }
    out = io.BytesIO()
    build(cfg, Task(model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches([4])),
          sinks=[JsonSink(out)]).run()  # fmt: skip
    assert b"s3cret" not in out.getvalue() and b'"password":"***"' in out.getvalue()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    files = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "client_cert", "client_key")}
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(files["key"]), "-out", str(files["cert"]))  # fmt: skip
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=scraper",
             "-keyout", str(files["client_key"]), "-out", str(files["client_cert"]))  # fmt: skip
    return files


def _scrape(url: str, context: ssl.SSLContext) -> str:
    with urllib.request.urlopen(url, timeout=5, context=context) as resp:
        return resp.read().decode()


def test_tls_and_client_certificates(tmp_path: Path, certs: dict[str, Path]) -> None:
    sink = PrometheusSink(port=0, certfile=str(certs["cert"]), keyfile=str(certs["key"]),
                          client_cafile=str(certs["client_cert"]))  # fmt: skip
    sink.open(run_context(tmp_path))
    try:
        url = sink.url
        assert url is not None and url.startswith("https://127.0.0.1:")
        trusting = ssl.create_default_context(cafile=str(certs["cert"]))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionResetError)):
            _scrape(url, trusting)  # no client certificate: refused
        trusting.load_cert_chain(str(certs["client_cert"]), str(certs["client_key"]))
        assert 'traintel_run_info{name="demo",run_id="r1"} 1.0' in _scrape(url, trusting)
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(url.replace("https://", "http://"), timeout=5)  # plain HTTP is not served
    finally:
        sink.close()


def test_tls_files_that_do_not_exist_are_bad_input(tmp_path: Path) -> None:
    from traintel.errors import ConfigError

    sink = PrometheusSink(port=0, certfile=str(tmp_path / "nope.pem"), keyfile=str(tmp_path / "nope.key"))
    with pytest.raises(ConfigError, match=r"^sinks\.prometheus\.certfile: no such file: .*nope\.pem$"):
        sink.open(run_context(tmp_path))


def test_credentials_in_the_url_are_basic_auth_and_never_shown(tmp_path: Path) -> None:
    seen: list[tuple[str, str | None]] = []

    class Gateway(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        sink = PrometheusSink(port=0, pushgateway=Pushgateway(url=f"http://ci:s3cret@127.0.0.1:{port}"))
        sink.open(run_context(tmp_path))
        sink.emit(_end())
        sink.push()
        sink.close()
    finally:
        server.shutdown()
    assert seen == [("/metrics/job/traintel/run_id/r1", "Basic Y2k6czNjcmV0")]  # base64 of ci:s3cret

    refused = free_port()
    sink = PrometheusSink(port=0, pushgateway=Pushgateway(url=f"http://ci:s3cret@127.0.0.1:{refused}"))
    sink.open(run_context(tmp_path))
    sink.emit(_end())
    message = f"push to http://***@127.0.0.1:{refused} failed: URLError: <urlopen error [Errno 111] Connection refused>"
    with pytest.raises(OSError, match=f"^{re.escape(message)}$"):
        sink.push()
    sink.close()
