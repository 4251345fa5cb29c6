"""The run's session: the resources a run holds, acquired in order, each registering its own undo.

Every ``acquire_*`` function takes the run's ``contextlib.ExitStack``, acquires one resource and
pushes what gives it back, so a failure at any point unwinds exactly what was acquired, in
reverse, and closing the stack at the end of the run releases everything. In the order a run
acquires them (``traintel.run.api.build``):

1. the process group (under torchrun): left again;
2. the run directory (made where missing) and, for a run that keeps files there, its lock on rank
   0: released, and the directories made removed again when they stayed empty;
3. the attempt's note, ``checkpoints/run.json``: removed again when a first attempt never started;
4. the sinks (their files, the exporter's port, stdout's capture) and the route of stdlib logging
   into the JSON lines: closed, the route removed after the sinks closed (a close that hangs is
   reported to the sinks still open).

The run's signal handlers are entered around the training itself (``Run.run``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import torch

from traintel.config import Config
from traintel.engine.coordination import Coordinator, ProcessGroupCoordinator
from traintel.errors import ConfigError, one_line
from traintel.run import distributed, layout, resume, rundir
from traintel.run.plan import Plan, Where
from traintel.run.signals import on_early_exit
from traintel.sinks.io.dirs import missing_dirs, remove_empty
from traintel.sinks.json.logs import route_stdlib_logging


def new_run_id(name: str) -> str:
    """``<name slug>-<UTC yyyymmddThhmmssZ>-<6 hex>``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "run"
    return f"{slug}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


def resolve_device(choice: str) -> torch.device:
    """``trainer.device``: auto is CUDA when there is a device, else the CPU."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device", "cuda was asked for but no CUDA device is available; use auto or cpu"
        )
    return torch.device(choice)


def acquire_process_group(stack: contextlib.ExitStack, config: Config) -> Where:
    """Under torchrun, join the process group (left again at the end); where this process runs."""
    device = resolve_device(config.trainer.device)
    launch = distributed.launch_from_env()
    if launch is None:
        return Where(device, Coordinator())
    device = distributed.device_for(launch, device)
    stack.callback(distributed.stop)
    backend, store = distributed.start(config.trainer.distributed, device, launch.restart_count)
    return Where(device, ProcessGroupCoordinator(device), launch, backend, store)


def agree(coordinator: Coordinator, problem: ConfigError | None) -> None:
    """Raise the first rank's problem on every rank (under torchrun each rank checks its own: all
    stop together), or nothing when no rank has one."""
    views = coordinator.gather(None if problem is None else (problem.key, problem.problem))
    first = next((view for view in views if view is not None), None)
    if first is not None:
        raise ConfigError(*first)


def run_identity(config: Config, where: Where) -> tuple[str, Path]:
    """The run id (shared by the ranks) and the run directory, before any earlier attempt is found."""
    run_id = config.run.id or new_run_id(config.run.name)
    if where.launch is not None and not config.run.id:
        run_id = distributed.shared_run_id(where.launch, run_id)
    return run_id, Path(config.run.dir or os.path.join("runs", run_id))


def acquire_run_dir(
    stack: contextlib.ExitStack, config: Config, run_dir: Path, coordinator: Coordinator, *, must_resume: bool
) -> None:
    """Create the run directory and, for a run that keeps files there, take its lock on rank 0
    before anything in it is read or written (``rundir.lock``); under torchrun the ranks agree,
    so all stop with the first rank's error. The directories made are removed again when they
    stay empty."""
    made = missing_dirs(run_dir)
    stack.callback(remove_empty, made)
    on_early_exit(lambda: remove_empty(made))  # a signal ending the start-up leaves none behind
    held: rundir.RunDirLock | ConfigError | None = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        held = ConfigError("run.dir", f"cannot create {str(run_dir)!r}: {exc.strerror}")
    else:
        cc = config.checkpoint
        keeps_files = config.sinks.diagnostic.enabled or cc.enabled or cc.best is not None or must_resume
        if keeps_files and coordinator.rank == 0:
            held = rundir.lock(run_dir)
    if isinstance(held, rundir.RunDirLock):
        stack.callback(held.release)
    agree(coordinator, held if isinstance(held, ConfigError) else None)


def check_run_dir(plan: Plan) -> None:
    """ConfigError, before any sink opens, when this run must not write into ``run.dir``
    (``rundir.problem``). Every rank checks; the ranks agree."""
    diagnostic = plan.config.sinks.diagnostic
    problem = None
    if plan.keeps_files:
        problem = rundir.problem(
            plan.run_dir,
            plan.where.coordinator.rank,
            diagnostic=diagnostic.filename,
            writes_diagnostic=diagnostic.enabled,
            continuing=plan.attempt.attempt > 0,
            config_text=plan.config_text,
        )
    agree(plan.where.coordinator, problem)


class AttemptNote:
    """``checkpoints/run.json``, written by rank 0 of a run that keeps checkpoints before any sink
    writes a file: a process killed from here on leaves a directory that ``run.resume=auto``
    continues, never one that looks like another run's. A first attempt that never starts removes
    it again (``started`` says it started)."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def started(self) -> None:
        """The attempt has started: its run.json stays."""
        self.path = None

    def _forget(self) -> None:
        path, self.path = self.path, None
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()


def acquire_attempt_note(stack: contextlib.ExitStack, plan: Plan) -> AttemptNote:
    """Rank 0 of a run that keeps checkpoints notes the attempt in ``run.json``."""
    note = AttemptNote()
    cp = plan.checkpointing
    if cp is None or plan.where.coordinator.rank != 0:
        return note
    made = missing_dirs(cp.directory)
    stack.callback(remove_empty, made)
    stack.callback(note._forget)
    if plan.attempt.attempt == 0:  # before writing: a write that fails part-way is removed too
        note.path = cp.directory / layout.RUN_FILE
    resume.write_run_file(cp.directory, plan.attempt.run_id, plan.attempt.attempt)
    return note


def acquire_sinks(stack: contextlib.ExitStack, plan: Plan) -> None:
    """Open the sinks (files, the exporter's port, stdout's capture) and route stdlib logging into
    the JSON lines. At the end the sinks close first, each within its bound, while logging is still
    routed (a close that hangs is reported to the sinks still open); then the route goes."""
    sinks = plan.sinks
    sinks.fanout.open(plan.context)
    undo: list[Callable[[], object]] = []

    def release() -> None:
        sinks.fanout.close(bounded=True)
        for step in reversed(undo):
            step()

    stack.callback(release)
    logs = sinks.logs
    if logs is not None:
        if logs is not sinks.json:  # a rank's log lines on stderr, apart from the fan-out
            logs.open(plan.context)
            undo.append(logs.close)
        undo.append(route_stdlib_logging(logs))


def note_completed(plan: Plan) -> None:
    """Rank 0 notes in ``run.json`` that this attempt trained all its epochs (or steps), so that
    resuming the run asks for more even where its last checkpoint is older than its end; an epoch the
    step limit cut does not count as done."""
    cp = plan.checkpointing
    if cp is None or plan.where.coordinator.rank != 0:
        return
    state = plan.trainer.state
    done = {"step": state.progress.run_steps, "epochs": state.epoch - 1 if state.epoch_cut else state.epoch}
    try:
        resume.write_run_file(cp.directory, plan.attempt.run_id, plan.attempt.attempt, completed=done)
    except OSError as exc:
        logging.getLogger("traintel").warning("run.json not updated: %s", one_line(exc))


def push_final(plan: Plan) -> None:
    """Push the final values to the Pushgateway once ``run.end`` is on stdout and durable in the
    diagnostic file (network work comes after the records are safe); a failed or abandoned push is
    a ``sink.error``, after ``run.end``."""
    sinks = plan.sinks
    prometheus = sinks.prometheus
    if prometheus is None or prometheus.pushgateway is None:
        return
    sinks.fanout.sync(2.0)
    try:
        prometheus.push()
    except OSError as exc:
        sinks.fanout.report(prometheus, exc)
