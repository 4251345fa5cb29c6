"""Shared helpers for tests that run traintel in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

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
    """The environment without TRAINTEL__ variables, ``path`` first on PYTHONPATH, 80 columns."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), *filter(None, [env.get("PYTHONPATH")])])
    env["COLUMNS"] = HELP_COLUMNS
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
