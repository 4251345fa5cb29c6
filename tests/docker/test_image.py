"""The image from ``docker/Dockerfile``, built and run by a real Docker engine.

The base image and the torch wheel index stand in for what cannot be pulled here
(``tests/helpers/docker_engine.py``); everything else is the Dockerfile as a user builds it. Skipped,
saying why, where no Docker engine can be started (not root, no ``dockerd``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.helpers.docker_engine import Engine, Unavailable, served, standin_base, torch_index
from tests.helpers.paths import ROOT
from tests.helpers.servers import free_port

pytestmark = pytest.mark.slow

TAG = "traintel:test"
UID = "10001"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    try:
        started = Engine(tmp_path_factory.mktemp("dockerd"))
    except Unavailable as exc:
        pytest.skip(f"no Docker engine: {exc}")
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def image(engine: Engine) -> str:
    """The image, built from the repository with the stand-in base and torch index."""
    base = standin_base(engine)
    with served(torch_index(ROOT / "constraints.txt")) as index:
        started = time.monotonic()
        engine.docker(
            "build", "--network", "host", "-f", "docker/Dockerfile", "-t", TAG,
            "--build-arg", f"PYTHON_IMAGE={base}", "--build-arg", f"TORCH_INDEX_URL={index}", str(ROOT),
            timeout=1500,
        )  # fmt: skip
        took = time.monotonic() - started
    size = int(engine.docker("image", "inspect", "-f", "{{.Size}}", TAG).stdout)
    print(f"\nimage {TAG}: built in {took:.0f} s, {size / 1e6:.0f} MB")
    return TAG


def test_it_runs_as_the_non_root_user(engine: Engine, image: str) -> None:
    assert engine.docker("image", "inspect", "-f", "{{.Config.User}}", image).stdout.strip() == f"{UID}:{UID}"
    ids = engine.docker("run", "--rm", "--network", "host", "--entrypoint", "id", image).stdout.strip()
    assert ids.startswith(f"uid={UID}(traintel) gid={UID}(traintel)")


def test_config_show_prints_the_image_s_config(engine: Engine, image: str) -> None:
    shown = engine.docker("run", "--rm", "--network", "host", image, "config", "show")
    assert shown.stdout.startswith("run:\n  name: traintel\n")
    assert "    host: 0.0.0.0\n" in shown.stdout  # the image's TRAINTEL__SINKS__PROMETHEUS__HOST


def test_a_run_serves_metrics_turns_healthy_and_stops_with_143(engine: Engine, image: str) -> None:
    port, name, volume = free_port(), "traintel-test-run", "traintel-test-runs"
    engine.docker("rm", "-f", name, check=False)
    engine.docker("volume", "rm", volume, check=False)
    try:
        engine.docker(
            "run", "-d", "--name", name, "--network", "host", "-v", f"{volume}:/app/runs",
            "-e", f"TRAINTEL__SINKS__PROMETHEUS__PORT={port}", "-e", "TRAINTEL__TRAINER__MAX_EPOCHS=100000",
            image,
        )  # fmt: skip
        # the exporter answers before the first step's records arrive: wait for a step, not an answer
        step = _first_step(f"http://127.0.0.1:{port}/metrics", deadline=time.monotonic() + 120)
        assert step >= 1
        deadline = time.monotonic() + 60  # the image's HEALTHCHECK: every 15 s
        while (health := _inspect(engine, name, "{{.State.Health.Status}}")) != "healthy":
            assert health == "starting" and time.monotonic() < deadline, health
            time.sleep(0.5)

        started = time.monotonic()
        engine.docker("stop", "-t", "10", name, timeout=60)
        took = time.monotonic() - started
        assert took < 10, took
        assert _inspect(engine, name, "{{.State.ExitCode}}") == "143"
        logs = engine.docker("logs", name)  # stdout and stderr apart
        last = json.loads(logs.stdout.splitlines()[-1])
        assert (last["event"], last["status"], last["reason"]) == ("run.end", "terminated", "SIGTERM")

        owned = engine.docker(
            "run", "--rm", "--network", "host", "-v", f"{volume}:/app/runs", "--entrypoint", "find", image,
            "/app/runs", "-name", "diagnostic.jsonl", "-printf", "%U %s\\n",
        ).stdout.split()  # fmt: skip
        assert owned[0] == UID and int(owned[1]) > 0
    finally:
        engine.docker("rm", "-f", name, check=False)
        engine.docker("volume", "rm", volume, check=False)


def test_debian_docker_compose_accepts_the_compose_file(engine: Engine) -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("no docker-compose here (apt-get install docker-compose)")
    done = subprocess.run(
        [compose, "-f", str(ROOT / "docker" / "compose.yaml"), "config", "--quiet"],
        env=engine.env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, "")


def _inspect(engine: Engine, name: str, template: str) -> str:
    return engine.docker("inspect", "-f", template, name).stdout.strip()


def _first_step(url: str, deadline: float) -> float:
    """``traintel_optimizer_step``'s value once a scrape of ``url`` shows one, polling until ``deadline``."""
    body = ""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                body = response.read().decode()
        except OSError:
            pass
        for line in body.splitlines():
            if line.startswith("traintel_optimizer_step "):
                return float(line.split()[1])
        assert time.monotonic() < deadline, f"{url} showed no optimizer step: {body[-300:]!r}"
        time.sleep(0.5)
