"""Errors that carry a user-facing one-line message and a documented exit status."""

from __future__ import annotations

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


def signal_exit(name: str) -> int:
    """The exit status for a run stopped by signal ``name`` (``SIGTERM``: 143): 128 + its number."""
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
