"""Shared helpers for tests that run traintel in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import pytest

from tests.helpers import warm
from tests.helpers.warm import WarmPopen

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


Child = subprocess.Popen[Any] | WarmPopen
"""A started child: a fresh interpreter's ``Popen``, or a child of the warm server."""


def _python_args(argv: Sequence[str]) -> list[str]:
    assert argv[0] == sys.executable, f"a child of the test interpreter, not {argv[0]!r}"
    return list(argv[1:])


def popen(
    argv: Sequence[str],
    *,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    text: bool = False,
    fresh: bool = False,
) -> Child:
    """Start ``[sys.executable, -m MODULE | -c CODE, ...]`` (``-u`` allowed) like ``subprocess.Popen``,
    forked from the warm server unless ``fresh`` (see ``tests.helpers.warm``). A test about the
    interpreter's own start-up passes ``fresh=True``. ``env`` defaults to this process's."""
    return warm.start(
        _python_args(argv), Path.cwd() if cwd is None else cwd, os.environ if env is None else env,
        stdin=stdin, stdout=stdout, stderr=stderr, text=text, fresh=fresh,
    )  # fmt: skip


def run_child(
    argv: Sequence[str],
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    *,
    text: bool = True,
    timeout: float = CHILD_TIMEOUT,
    fresh: bool = False,
) -> subprocess.CompletedProcess[Any]:
    """Run ``argv`` (``[sys.executable, ...]``, as ``popen`` takes it) in ``cwd`` to its end, capturing
    its output (text unless ``text=False``); the environment defaults to ``child_env(cwd)``."""
    where = Path.cwd() if cwd is None else Path(cwd)
    return warm.run(
        _python_args(argv), where, child_env(None if cwd is None else where) if env is None else env,
        text=text, timeout=timeout, fresh=fresh,
    )  # fmt: skip


def run_cli(
    cwd: Path, *args: str, env: Mapping[str, str] | None = None, fresh: bool = False
) -> subprocess.CompletedProcess[str]:
    """``python -m traintel ARGS`` in ``cwd`` with no inherited TRAINTEL__ variables; ``fresh``: a
    new interpreter instead of a child of the warm server."""
    return run_child([sys.executable, "-m", "traintel", *args], cwd, child_env(cwd, env), fresh=fresh)


def probe_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``traintel ARGS`` through ``PROBE`` in ``cwd``: a fresh interpreter, to see what it imports."""
    return run_child([sys.executable, "-c", PROBE, *args], cwd, fresh=True)


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
