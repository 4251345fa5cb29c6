"""Errors that carry a user-facing one-line message and a documented exit status."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from traintel.redaction import redact_url

EXIT_OK = 0
"""The run finished (completed, or stopped early by a handler such as EarlyStopping)."""
EXIT_FAILED = 1
"""Training raised an exception; the ``run.end`` record says which."""
EXIT_BAD_INPUT = 2
"""Bad input (config, task factory, port in use, usage): nothing was trained or written."""
EXIT_SIGHUP = 129
"""Stopped by SIGHUP (a closed terminal, some supervisors), as SIGTERM."""
EXIT_SIGINT = 130
"""Stopped by SIGINT after finishing the current optimizer step."""
EXIT_SIGTERM = 143
"""Stopped by SIGTERM after finishing the current optimizer step."""

EXIT_STATUSES: Final[Mapping[int, str]] = MappingProxyType(
    {
        EXIT_OK: "The run finished: ``max_epochs`` reached, or ended early by a handler such as "
        "EarlyStopping.",
        EXIT_FAILED: "Training raised, including user code that breaks its contract while training "
        "(``count_items`` returning 2.7: never truncated) or calls ``sys.exit``; ``run.end`` has "
        "``status: failed`` and the exception as ``reason``. A plug-in sink that raises (``SystemExit`` "
        "too) is not this: it is a ``sink.error``, and training goes on.",
        EXIT_BAD_INPUT: "Bad input: config key, type or range, missing or invalid file, unimportable or "
        "failing task factory (also one calling ``sys.exit``), a training loader with no batches, a "
        "loader whose sampler cannot be sharded over the ranks, stdout closed (``>&-``) while "
        "``sinks.json`` is on, port in use, a bad torchrun environment (``RANK``, ``WORLD_SIZE``, "
        "``MASTER_ADDR``, ...), usage. One line on stderr (``traintel: error: <key>: <problem>``), no "
        "traceback, nothing trained or written.",
        EXIT_SIGHUP: "Stopped by SIGHUP (a closed terminal, some supervisors), as by SIGTERM (143).",
        EXIT_SIGINT: "Stopped by SIGINT (Ctrl-C), as by SIGTERM (143).",
        EXIT_SIGTERM: "Stopped by SIGTERM (``docker stop``, Kubernetes, torchrun): "
        "the current optimizer step finishes (a window being fetched is trained first; in one process an "
        "evaluation in progress stops without an ``eval.epoch`` and runs again when the run resumes), a "
        "checkpoint of it is taken when checkpoints are on, ``run.end`` has ``status: terminated`` and the "
        "signal as ``reason`` and is written to stdout and fsynced in the diagnostic file, then the final "
        "values are pushed (at most ``sinks.prometheus.pushgateway.timeout_seconds``) and the sinks closed "
        "(a sink's close that hangs is abandoned after 2 s), within 10 s whatever the gateway, the scrapers "
        "or plug-in sinks do. A signal during start-up (importing torch, joining the process group, a slow "
        "task factory) ends the process within a second with one line (``traintel: error: SIGTERM during "
        "start-up: stopped before training``), the signal's status and nothing written. Under torchrun a "
        "rank stopped because another rank was signalled ends the same way and exits 143. A second signal "
        "while stopping exits at once with the first one's status; one after ``run.end`` abandons the push "
        "and exits at once with the run's status (143 for a stopped run, 0 for a completed one).",
    }
)
"""Every exit status of the ``traintel`` command and what it means: the one table the documentation's
exit-status reference is generated from."""


def signal_exit(name: str) -> int:
    """The exit status for a run stopped by signal ``name`` (``SIGTERM``: 143): 128 + its number, one of
    ``EXIT_STATUSES``."""
    return {"SIGHUP": EXIT_SIGHUP, "SIGINT": EXIT_SIGINT, "SIGTERM": EXIT_SIGTERM}[name]


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (or just the type), for one-line reports."""
    text = redact_url(str(exc).strip())  # a URL's credentials never reach a report
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class TraintelError(Exception):
    """Base class for errors whose message is shown to the user as one line."""

    exit_code = EXIT_FAILED


class ConfigError(TraintelError):
    """Bad input: the message names the config key (or argument) and what is allowed."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


class NonFiniteLoss(TraintelError, RuntimeError):
    """A step's loss was NaN or infinite under ``trainer.on_nonfinite=stop``: the run fails, naming
    the first such step."""

    def __init__(self, step: int) -> None:
        self.step = step
        super().__init__(f"non-finite loss at step {step} (trainer.on_nonfinite=stop)")
