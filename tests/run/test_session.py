"""A run's session gives back exactly what it acquired: a failure at any acquisition of ``build``
(or ``close`` without a run) leaves no file or directory, no listening port, no replaced stdout, no
log handler or warnings hook, no signal handler, no thread and no process group behind.

Each case runs once in one process and once as the one rank of a real gloo process group
(``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` as torchrun sets them).
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.helpers.tasks import make_batches, make_model
from traintel.errors import ConfigError
from traintel.run import api, resume, rundir, session
from traintel.sinks.base import RunContext
from traintel.task import Task


class Injected(RuntimeError):
    """The failure injected at one acquisition."""


def failing_factory() -> Task:
    """A task factory that fails (the task is made once the process group is joined)."""
    raise Injected("the task factory failed")


def working_factory() -> Task:
    return Task(model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches([4] * 4))


class _FailsToOpen:
    name = "fails-to-open"

    def open(self, context: RunContext) -> None:
        raise OSError("the remote store is unreachable")

    def emit(self, record: object) -> None:
        pass

    def close(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _raise(*_args: Any, **_kwargs: Any) -> Any:
    raise Injected("injected")


def _after(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original``, then the injected failure (the resource was acquired when it fails)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        original(*args, **kwargs)
        raise Injected("injected")

    return call


INJECTIONS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "task factory": lambda mp: None,  # the config names failing_factory
    "run directory lock": lambda mp: mp.setattr(rundir, "lock", _raise),
    "after the lock": lambda mp: mp.setattr(rundir, "lock", _after(rundir.lock)),
    "attempt": lambda mp: mp.setattr(resume, "decide", _raise),
    "plan": lambda mp: mp.setattr(api, "make_plan", _raise),
    "run.json": lambda mp: mp.setattr(resume, "write_run_file", _raise),
    "after run.json": lambda mp: mp.setattr(resume, "write_run_file", _after(resume.write_run_file)),
    "a sink's open": lambda mp: None,  # the run gets a sink that fails to open
    "log routing": lambda mp: mp.setattr(session, "route_stdlib_logging", _raise),
}


@pytest.fixture(params=["one process", "process group"])
def launch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "process group":
        for name, value in {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
        }.items():
            monkeypatch.setenv(name, value)
    yield request.param
    if dist.is_initialized():  # a failed case: leave the next one a clean process
        dist.destroy_process_group()


def _config(tmp_path: Path, port: int, factory: str) -> dict[str, Any]:
    return {
        "run": {"dir": str(tmp_path / "made" / "for" / "run"), "id": "session-run"},
        "task": {"factory": f"tests.run.test_session:{factory}"},
        "trainer": {"device": "cpu", "max_epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}},
        "checkpoint": {"every_steps": 1},
        "sinks": {
            "json": {"enabled": True, "format": "json"},
            "diagnostic": {"enabled": True},
            "prometheus": {"enabled": True, "host": "127.0.0.1", "port": port},
        },
    }


def _held() -> dict[str, Any]:
    """What a run may hold of the process: compared before and after."""
    return {
        "stdout": sys.stdout,
        "stderr": sys.stderr,
        "log handlers": list(logging.getLogger().handlers),
        "showwarning": warnings.showwarning,
        "signals": {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)},
        "threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("traintel")),
        "process group": dist.is_initialized(),
    }


@pytest.mark.parametrize("where", list(INJECTIONS))
def test_a_failure_at_any_acquisition_gives_back_exactly_what_was_acquired(
    where: str, launch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _free_port()
    cfg = _config(tmp_path, port, "failing_factory" if where == "task factory" else "working_factory")
    extra = [_FailsToOpen()] if where == "a sink's open" else []
    before = _held()
    INJECTIONS[where](monkeypatch)
    expected: type[Exception] = ConfigError if where in ("a sink's open", "task factory") else Injected
    with pytest.raises(expected):
        api.build(cfg, sinks=extra)
    assert _held() == before
    assert not (tmp_path / "made").exists()
    assert _port_is_free(port)


def test_closing_a_run_that_never_ran_gives_everything_back(
    launch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _free_port()
    before = _held()
    run = api.build(_config(tmp_path, port, "working_factory"))
    held = _held()
    assert held["threads"] != [] and not _port_is_free(port)
    assert held["process group"] is (launch == "process group")
    assert (tmp_path / "made" / "for" / "run" / "checkpoints" / "run.json").is_file()
    run.close()
    run.close()  # a second close is harmless
    assert _held() == before
    assert _port_is_free(port)
    # what the first attempt made and never used is gone: run.json, the empty diagnostic file's
    # directory stays only when a file is in it
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert "made/for/run/checkpoints/run.json" not in left
