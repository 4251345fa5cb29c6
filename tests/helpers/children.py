"""Shared helpers for tests that run traintel in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

CHILD_TIMEOUT = 240
"""Seconds; a generous ceiling so a hung child fails its test instead of the whole session."""

HELP_COLUMNS = "80"
"""The terminal width the children see (argparse wraps help to it)."""

PROBE = textwrap.dedent(
    """\
    import sys
    from traintel.cli.main import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
    print(code, "torch" in sys.modules, file=sys.stderr)
    """
)
"""Runs the CLI in-process in a child and ends stderr with ``<exit code> <whether torch was imported>``."""


def child_env(path: Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without TRAINTEL__ variables, ``path`` first on PYTHONPATH, 80 columns, and one
    intra-op thread (``OMP_NUM_THREADS=1``): the tests' models are tiny, and with two test workers
    sharing two cores, a second thread per child only waits for the other child."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), *filter(None, [env.get("PYTHONPATH")])])
    env["COLUMNS"] = HELP_COLUMNS
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def run_child(
    argv: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in ``cwd`` (default environment: ``child_env(cwd)``), capturing text output."""
    return subprocess.run(
        argv,
        cwd=cwd,
        env=child_env(cwd) if env is None else env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )


def run_cli(cwd: Path, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m traintel ARGS`` in ``cwd`` with no inherited TRAINTEL__ variables."""
    return run_child([sys.executable, "-m", "traintel", *args], cwd, child_env(cwd, env))


def probe_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``traintel ARGS`` through ``PROBE`` in ``cwd``."""
    return run_child([sys.executable, "-c", PROBE, *args], cwd)


CRASH_MESSAGE = "loss exploded on micro-batch 7"
"""What the task ``write_crashing_task`` writes raises, in a RuntimeError."""


def write_crashing_task(directory: Path, *, rank: int | None = None) -> None:
    """Write ``crashing.py`` into ``directory``: ``make_task`` is the forecast task (320 samples, no
    validation) whose loss function raises ``RuntimeError(CRASH_MESSAGE)`` on its 7th call, on every
    process or only on the rank ``rank`` (``RANK``). Use it as ``task.factory=crashing:make_task``
    with ``task.params={}`` and ``directory`` on the child's path."""
    on_rank = "True" if rank is None else f'os.environ["RANK"] == "{rank}"'
    (directory / "crashing.py").write_text(
        textwrap.dedent(
            f"""
            import os
            import torch
            from traintel.tasks.forecast import make_task as base

            def make_task():
                task = base(train_samples=320, val_samples=0)
                calls = {{"n": 0}}

                def loss_fn(out, y):
                    calls["n"] += 1
                    if calls["n"] == 7 and {on_rank}:
                        raise RuntimeError({CRASH_MESSAGE!r})
                    return torch.nn.functional.mse_loss(out, y)

                task.loss_fn = loss_fn
                return task
            """
        )
    )


@dataclass(frozen=True)
class CliResult:
    """What one in-process ``traintel`` call printed and returned, like ``subprocess.CompletedProcess``."""

    returncode: int
    stdout: str
    stderr: str


class Cli(Protocol):
    """The ``cli`` fixture: ``cli_in_process`` in the test's ``tmp_path``."""

    def __call__(self, *args: str, env: Mapping[str, str] | None = None) -> CliResult: ...


def cli_in_process(
    cwd: Path,
    *args: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    env: Mapping[str, str] | None = None,
) -> CliResult:
    """``traintel ARGS`` as ``cli.main(ARGS, owns_process=False)`` in this process: in ``cwd`` (also
    first on ``sys.path``, for task factories written there), with ``env`` added, 80 columns and the
    file descriptors 1 and 2 captured. The modules imported from ``cwd`` are forgotten afterwards, so
    the next call imports its own."""
    from traintel.cli.main import main

    monkeypatch.chdir(cwd)
    monkeypatch.syspath_prepend(str(cwd))
    monkeypatch.setenv("COLUMNS", HELP_COLUMNS)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    before = set(sys.modules)
    capfd.readouterr()
    try:
        status = main(list(args), owns_process=False)
    except SystemExit as exc:  # argparse: --help, usage errors
        status = exc.code if isinstance(exc.code, int) else 1
    finally:
        for name in set(sys.modules) - before:
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if origin.startswith(str(cwd)):
                del sys.modules[name]
    out, err = capfd.readouterr()
    return CliResult(status, out, err)
